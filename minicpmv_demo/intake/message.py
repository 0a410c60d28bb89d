"""Turning what a chat client sends (Gradio messages, API payloads) into a `Conversation`.

Messages arrive in several shapes: Gradio's normalised parts (`{"type": "file", "file": {...}}`),
plain strings, bare file dicts from API clients. They are read leniently, but every file is
checked strictly: it must lie in an upload folder (never an arbitrary server path) and pass
image validation (video validation for .mp4, .webm and .mov files). Messages that carry
`metadata` are display-only (the stats line under a reply, a reply's reasoning) and are never
sent back to the model, nor is reasoning written inside an earlier reply's text.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..system.byte_size import byte_size
from .conversation import Conversation, PromptOptions, Turn
from .images import ImageError, ImageLimits, PreparedImage, check_upload_file, prepare_image
from ..system.lru import LruCache
from ..engine.reasoning import without_reasoning
from .videos import PreparedVideo, VideoError, VideoLimits, is_video_path, prepare_video


class InputError(ValueError):
    """The request cannot be answered as sent; str() is a short message for the user."""


@dataclass(frozen=True)
class InputRules:
    """What a request may contain; from the settings."""

    image_limits: ImageLimits
    max_images: int
    allowed_roots: tuple[str, ...]  # upload folders that files may come from
    max_message_chars: int = 100_000
    max_history_messages: int = 400
    max_history_chars: int = 1_000_000
    video_limits: VideoLimits | None = None  # None: the model does not read videos
    max_videos: int = 1  # per message; they count among max_images too
    video_frames: int = 32  # frames taken when the request names no max_num_frames


def build_conversation(message: dict | str, history: Sequence[dict] | None, *, system_prompt: str,
                       rules: InputRules, options: PromptOptions = PromptOptions()) -> tuple[Conversation, list[str]]:
    """Return the conversation to answer and notices for the user (e.g. "image downscaled")."""
    text, files = _split_message(message)
    if not text.strip() and not files:
        raise InputError("Please type a question or attach an image (or a video).")
    if len(text) > rules.max_message_chars:
        raise InputError(f"The message is too long: {len(text):,} characters (the limit is "
                         f"{rules.max_message_chars:,}). Please shorten it.")
    videos = sum(is_video_path(path) for path in files)
    if len(files) > rules.max_images:
        kinds = "images and videos" if videos else "images"
        raise InputError(f"Too many {kinds} in one message: {len(files)} (the limit is {rules.max_images}).")
    if videos > rules.max_videos:
        raise InputError(f"Too many videos in one message: {videos} (the limit is {rules.max_videos}).")
    frames = options.max_num_frames or rules.video_frames
    turns = _history_turns(_checked_history(history), rules, frames)
    new_turn = _user_turn(text.strip(), files, rules, frames)
    notices = [notice for item in (*new_turn.images, *new_turn.videos) for notice in item.notices]
    turns.append(new_turn)
    return Conversation(turns=tuple(_merge_same_role(turns)), system_prompt=valid_unicode(system_prompt.strip()),
                        options=options), notices


def valid_unicode(text: str) -> str:
    """`text` with lone surrogates (which JSON can carry, "\\ud800", and no tokenizer takes)
    replaced by U+FFFD, as a browser shows them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _split_message(message: dict | str) -> tuple[str, list[str]]:
    if isinstance(message, str):
        return message, []
    if not isinstance(message, dict):
        raise InputError("The message must be text, or {'text': ..., 'files': [...]}.")
    text = message.get("text") or ""
    if not isinstance(text, str):
        raise InputError("The message text must be a string.")
    return valid_unicode(text), [file_path(item) for item in message.get("files") or []]


def _checked_history(history) -> list:
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise InputError("The history must be a list of messages.")
    return list(history)


def _history_turns(history: list, rules: InputRules, frames: int) -> list[Turn]:
    """The earlier messages as turns, within the limits: a request carries at most so many
    messages and characters, so no client can make the server read an unbounded history."""
    if len(history) > rules.max_history_messages:
        raise InputError(f"The chat is too long: {len(history):,} earlier messages (the limit is "
                         f"{rules.max_history_messages:,}). Clear the chat or start a new one.")
    turns, chars = [], 0
    for entry in history:
        if not isinstance(entry, dict) or entry.get("role") not in ("user", "assistant"):
            raise InputError("Each history entry needs a role ('user' or 'assistant') and content.")
        if entry.get("metadata"):
            continue  # display-only lines such as the GPU memory under a reply
        texts, paths = content_parts(entry.get("content"))
        chars += sum(len(t) for t in texts)
        if chars > rules.max_history_chars:
            raise InputError(f"The chat is too long: its earlier messages hold over "
                             f"{rules.max_history_chars:,} characters. Clear the chat or start a new one.")
        text = valid_unicode("\n".join(t for t in texts if t))
        # The model never sees files "said" by the assistant, so they are not even opened. An
        # earlier reply goes back as its answer alone: reasoning sent back confuses the model
        # (upstream, `</think>` went missing after the first turn) and costs context.
        turns.append(_user_turn(text, paths, rules, frames) if entry["role"] == "user"
                     else Turn("assistant", without_reasoning(text)))
    return turns


def _user_turn(text: str, paths: list[str], rules: InputRules, frames: int) -> Turn:
    """A user turn with its files read: videos by their suffix, everything else as a picture."""
    images = tuple(_load(path, rules) for path in paths if not is_video_path(path))
    videos = tuple(_load_video(path, rules, frames) for path in paths if is_video_path(path))
    return Turn(role="user", text=text, images=images, videos=videos)


def check_file(path: str, rules: InputRules) -> list[str]:
    """Check one file the moment it is attached, as a message carrying it would be checked;
    returns notices for the user, raises InputError. A picture is opened and kept (the cache a
    message reads), so sending it later costs nothing more; a video is checked for its upload
    and size only (its frames are read when it is sent, with the frame count asked for)."""
    if not is_video_path(path):
        return list(_load(path, rules).notices)
    if rules.video_limits is None:
        raise InputError(f"{Path(path).name}: this model does not read videos; attach pictures instead.")
    real, _ = _uploaded(path, rules)
    try:
        check_upload_file(Path(real), Path(path).name, rules.video_limits.max_file_bytes, VideoError, "videos")
    except VideoError as exc:
        raise InputError(str(exc)) from None
    return []


def content_parts(content) -> tuple[list[str], list[str]]:
    """The texts and the file paths in one message's content, whatever shape it came in."""
    texts, paths = [], []
    for part in _parts(content):
        if isinstance(part, str):
            texts.append(part)
        elif part.get("type") == "text" or "text" in part:
            texts.append(str(part.get("text", "")))
        else:
            paths.append(file_path(part))
    return texts, paths


def _parts(content) -> list:
    if content is None:
        return []
    if isinstance(content, (str, dict)):
        return [content]
    if isinstance(content, (list, tuple)):
        return list(content)
    raise InputError("History content must be text, a file, or a list of those.")


def file_path(item) -> str:
    """The server path of an uploaded file, whatever wrapper it came in."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        inner = item.get("file") if isinstance(item.get("file"), dict) else item
        path = inner.get("path")
        if isinstance(path, str) and path:
            return path
    raise InputError("An attached file could not be read (no path).")


def _merge_same_role(turns: list[Turn]) -> list[Turn]:
    """Gradio shows each uploaded image as its own message; the model wants one turn per speaker."""
    merged: list[Turn] = []
    for turn in turns:
        if merged and merged[-1].role == turn.role:
            last = merged[-1]
            text = "\n".join(t for t in (last.text, turn.text) if t)
            merged[-1] = Turn(role=turn.role, text=text, images=last.images + turn.images,
                              videos=last.videos + turn.videos)
        else:
            merged.append(turn)
    while merged and merged[0].role != "user":
        merged.pop(0)  # a chat opens with the user; a leading greeting would confuse the template
    return merged


def _load(path: str, rules: InputRules) -> PreparedImage:
    real, content = _uploaded(path, rules)
    key = (content, Path(real).name, rules.image_limits)
    prepared = _prepared.get(key)
    if prepared is None:
        try:
            prepared = prepare_image(real, rules.image_limits)
        except ImageError as exc:
            raise InputError(str(exc)) from None
        _prepared.put(key, prepared)
    return prepared


def _load_video(path: str, rules: InputRules, frames: int) -> PreparedVideo:
    """A video's sampled frames, cached by file content and frame count like pictures."""
    if rules.video_limits is None:
        raise InputError(f"{Path(path).name}: this model does not read videos; attach pictures instead.")
    real, content = _uploaded(path, rules)
    key = (content, Path(real).name, rules.video_limits, frames)
    prepared = _prepared_videos.get(key)
    if prepared is None:
        try:
            prepared = prepare_video(real, rules.video_limits, frames)
        except VideoError as exc:
            raise InputError(str(exc)) from None
        _prepared_videos.put(key, prepared)
    return prepared


def _uploaded(path: str, rules: InputRules) -> tuple[str, str]:
    """The real path of an uploaded file and its content digest; refuses any other path."""
    real = os.path.realpath(path)
    if not any(real.startswith(os.path.realpath(root) + os.sep) for root in rules.allowed_roots):
        raise InputError(f"{Path(path).name} is not an uploaded file; upload it instead.")
    try:
        return real, _file_digest(real)
    except OSError:
        raise InputError(f"{Path(path).name} is no longer on the server; please upload it again.") from None


def _file_digest(path: str) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


# Checked and normalised pictures by file content: a follow-up turn, or the same picture uploaded
# again, is not decoded twice. 32 MB: four full 1344-px pictures (7.2 MB each in Pillow), a whole
# message, or more smaller ones. It is what stays in memory after a burst of large uploads.
_prepared: LruCache[PreparedImage] = LruCache(32 * 2**20, size=lambda prepared: byte_size(prepared.image))
# Sampled video frames by file content and frame count: a follow-up question about the same clip
# is not decoded again. 64 MB: a clip's 32 default frames of at most 640x360 take 29 MB in Pillow.
_prepared_videos: LruCache[PreparedVideo] = LruCache(64 * 2**20,
                                                     size=lambda prepared: byte_size(prepared.frames))
