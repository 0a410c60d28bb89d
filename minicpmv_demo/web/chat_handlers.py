"""What the page's chat events do. They only talk to `ChatService` (and through it the engine,
which owns the model): no handler touches the model.

A question goes in two steps. `ask` runs at once, outside the model's queue: it shows the
question in the chat with its place in line and keeps it by question id (`WaitingQuestions`).
`answer` runs in the queue when the question's turn comes and streams the reply in place of the
note. So a question never waits unseen in the input box, however long the queue.

A request the service refuses (InputError) is a notice and nothing else: the question leaves
the chat and goes back to the box to be fixed, so it never poisons the history that later
questions send. Engine failures end the reply with a line in the chat, never an error overlay.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from ..engine import FinishReason, ReplyError, ReplyStream
from ..intake.message import InputError, check_file, content_parts, file_path
from ..intake.videos import is_video_path
from .chat_service import ChatService
from .chat_view import (ReplyView, error_note, foot, input_placeholder, reply_id_of, split_last_user_turn,
                        stats_foot, user_bubbles, waiting_note)
from .feedback import RATINGS, AnsweredReplies, FeedbackLog
from .questions import Key, LiveQuestions, WaitingQuestion, WaitingQuestions, question_key
from .waiting import WaitingLine

ANSWERING_PLACEHOLDER = "Answering… press ■ to stop. You can type your next question; send it when the answer ends."
MORE_TOKENS = "more-tokens:"  # the option under a reply that ran out of tokens while thinking, + the count
# What keeping a waiting question costs beyond its text, counted against WaitingQuestions' bound.
ENTRY_CHARS, FILE_CHARS = 1_000, 1_000
RESIZED = re.compile(r"^(?P<name>.+) was downscaled from \S+ to \S+\.$")

# What `ask` and its siblings return: the chat, the box and the question id.
Asked = tuple
NOT_ASKED = (gr.skip(), gr.skip(), gr.skip())


def busy_box(value: dict | None = None) -> dict:
    """The box while a reply streams: Stop in place of Send; emptied when a question was sent."""
    return _box(answering=True, placeholder=ANSWERING_PLACEHOLDER, value=value)


def idle_box(service: ChatService, value: dict | None = None) -> dict:
    """The box between replies: Send, and the placeholder stating the limits (`value`: put back in it)."""
    return _box(answering=False, placeholder=input_placeholder(service.settings), value=value)


def _box(answering: bool, placeholder: str, value: dict | None) -> dict:
    """The message box's update: Stop or Send, its placeholder, and `value` in it (None: left as is)."""
    update = {"submit_btn": not answering, "stop_btn": answering, "placeholder": placeholder}
    return gr.update(**update) if value is None else gr.update(value=value, **update)


def stopped_early(question: WaitingQuestion) -> list[dict]:
    """The chat with a question stopped before its answer began (by Stop, or in its place)."""
    return question.shown + [foot("■ stopped before the answer began", reply_id=None)]


def friendly_notice(notice: str) -> str:
    """A notice from the intake as a visitor reads it (no pixel sizes)."""
    resized = RESIZED.match(notice)
    return f"{resized['name']}: large picture, resized for the model." if resized else notice


class ChatHandlers:
    """The page's chat: questions, answers, Stop, the actions under a reply, ratings, files."""

    def __init__(self, service: ChatService, model_name: str, waiting: WaitingLine, feedback: FeedbackLog) -> None:
        self.service = service
        self.model_name = model_name
        self.waiting = waiting
        self.feedback = feedback
        self.questions = LiveQuestions()
        self.waiting_questions = WaitingQuestions()
        self.replies = AnsweredReplies()

    # -- a question goes in ---------------------------------------------------------------------
    def ask(self, message, history, question_id: str, request: gr.Request) -> Asked:
        """Show the question at once, with its place in line; `answer` takes it from there."""
        message = message if isinstance(message, dict) else {"text": str(message or ""), "files": []}
        if not (message.get("text") or "").strip() and not message.get("files"):
            gr.Warning("Please type a question or attach an image (or a video).")
            return NOT_ASKED
        return self._asked(history, message, question_id, request, empty_box=True)

    def ask_again(self, history, question_id: str, request: gr.Request) -> Asked:
        """Retry: the last question again, in place of its answer."""
        earlier, message = split_last_user_turn(history)
        if message is None:
            gr.Info("Nothing to retry yet.")
            return NOT_ASKED
        return self._asked(earlier, message, question_id, request)

    def ask_with_more_tokens(self, history, question_id: str, selected: gr.SelectData, request: gr.Request) -> tuple:
        """The option under a reply that ran out of tokens while thinking: retry with the count it
        names (twice as many), which the max-new-tokens slider takes too."""
        value = str(selected.value or "")
        count = value.removeprefix(MORE_TOKENS)
        if not value.startswith(MORE_TOKENS) or not (count.isascii() and count.isdigit() and len(count) < 8):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (*self.ask_again(history, question_id, request),
                min(int(count), self.service.settings.max_new_tokens))

    def _asked(self, history, message: dict, question_id: str, request: gr.Request, empty_box: bool = False) -> Asked:
        """Keep the question for its answer and draw it with its place in line; a question over
        the limits a message and a chat may hold stays in the box with a notice instead."""
        key = question_key(request.session_hash, question_id)
        if key is None:
            return NOT_ASKED
        if self.questions.busy(key[0]) or self.waiting_questions.waiting(key[0]):
            gr.Warning("Your question is still in the box: send it when the answer ends (or press ■ to stop it).")
            return NOT_ASKED
        earlier = list(history or []) if isinstance(history, (list, tuple)) else []
        size = self._checked_size(message, earlier)
        if size is None:
            return NOT_ASKED
        shown = earlier + user_bubbles(message)
        self.waiting_questions.put(key, WaitingQuestion(message=message, history=earlier, shown=shown, size=size))
        box = busy_box({"text": "", "files": []} if empty_box else None)
        return shown + [waiting_note(self.waiting.ahead())], box, question_id

    def _checked_size(self, message: dict, history: list) -> int | None:
        """What keeping a question and its chat costs, in characters, or None (with a notice) when
        they are over the limits: checked before anything is kept (each file is checked by `answer`)."""
        rules = self.service.rules
        try:
            text = message.get("text") or ""
            if not isinstance(text, str) or len(text) > rules.max_message_chars:
                raise InputError(f"The message is too long: {len(str(text)):,} characters (the limit is "
                                 f"{rules.max_message_chars:,}). Please shorten it.")
            files = message.get("files") or []
            if not isinstance(files, list) or len(files) > rules.max_images:
                raise InputError(f"Too many files in one message (the limit is {rules.max_images}).")
            if len(history) > rules.max_history_messages:
                raise InputError(f"The chat is too long: {len(history):,} earlier messages (the limit is "
                                 f"{rules.max_history_messages:,}). Start a new chat.")
            chars = sum(len(part) for entry in history if isinstance(entry, dict)
                        for part in content_parts(entry.get("content"))[0])
            if chars > rules.max_history_chars:
                raise InputError(f"The chat is too long: its earlier messages hold over "
                                 f"{rules.max_history_chars:,} characters. Start a new chat.")
        except InputError as exc:
            gr.Warning(str(exc))
            return None
        return chars + len(text) + ENTRY_CHARS + FILE_CHARS * (len(files) + len(history))

    # -- its answer -----------------------------------------------------------------------------
    def answer(self, question_id: str, max_new, temperature, top_p, top_k, penalty, thinking, fine_detail,
               slices, frames, system, request: gr.Request) -> Iterator[tuple]:
        """Check and queue the question `ask` kept, then stream its reply into the chat; the box
        offers Send again with the last update, once the session may ask its next question."""
        key = question_key(request.session_hash, question_id)
        began = key is not None and self.questions.begin(key)  # busy before the question leaves the waiting
        question = self.waiting_questions.take(key) if key else None
        if question is None:
            if began:
                self.questions.drop(key)
            yield from self._not_kept(key)
            return
        try:  # whatever happens, the session is free again before its box offers Send
            last = yield from self._answered(key, question, (max_new, temperature, top_p, top_k, penalty),
                                             (thinking, fine_detail, slices, frames, system))
        finally:
            self.questions.end(key)
        yield last

    def _answered(self, key: Key, question: WaitingQuestion, sampling: tuple, prompt: tuple) -> Iterator[tuple]:
        """The reply's updates; returns the last one: the finished chat and the box given back."""
        if self.questions.stopped_before_start(key):
            return stopped_early(question), self.idle
        thinking, fine_detail, slices, frames, system = prompt
        try:
            params = self.service.params(*sampling)
            options = self.service.options(enable_thinking=bool(thinking), downsample_mode="4x" if fine_detail else "16x",
                                           max_slice_nums=slices, max_num_frames=frames)
            stream, _ = self.service.submit(question.message, question.history, params, system or "",
                                            options=options)
        except InputError as exc:
            gr.Warning(str(exc))
            return question.history, idle_box(self.service, question.message)  # the question back in the box
        self.questions.start(key, stream)
        try:
            chat = yield from self._streamed(stream, question)
        finally:
            stream.cancel()  # no-op when finished; frees the row when the tab closed mid-answer
        return chat, self.idle

    @property
    def idle(self) -> dict:
        return idle_box(self.service)

    def _not_kept(self, key: Key | None) -> Iterator[tuple]:
        """No waiting question under `key`: the page's send was refused (its id is then the
        answer's that still streams, left alone), or a flood of questions pushed it out."""
        if key is None or self.questions.known(key):
            yield gr.skip(), gr.skip()
            return
        gr.Warning("Your question was dropped while the server was flooded with questions: please send it again.")
        yield gr.skip(), self.idle

    def _streamed(self, stream: ReplyStream, question: WaitingQuestion) -> Iterator[tuple]:
        """The reply's updates as it streams; returns the chat with the finished reply."""
        shown, view = question.shown, ReplyView(thinking=stream.thinking)
        told = 0
        try:
            for text in stream.updates(self.service.current_stream_interval):
                told = self._tell(stream, told)
                yield shown + view.messages(text), gr.skip()
            self._tell(stream, told)
            return shown + view.messages(stream.text, ended=True) + [self._foot(stream, view, question)]
        except ReplyError as exc:
            return shown + view.messages(stream.text, ended=True) + [error_note(str(exc))]

    @staticmethod
    def _tell(stream: ReplyStream, told: int) -> int:
        """Show the stream's notices not shown yet (a reasoning cut); returns how many are shown."""
        for notice in stream.notices[told:]:
            gr.Info(friendly_notice(notice))
        return len(stream.notices)

    def _foot(self, stream: ReplyStream, view: ReplyView, question: WaitingQuestion) -> dict:
        """The finished reply's foot line; the reply is kept under an id its ratings name."""
        message = question.message
        reply_id = self.replies.add(question=message.get("text") or "",
                                    images=[Path(file_path(f)).name for f in message.get("files") or []],
                                    answer=view.answer(stream.text), model=self.model_name)
        stats = stream.stats
        thinking_only = view.thinking_only(stream.text)
        line = stats_foot(self.service.stats_line(stats) if stats else "", stats, reply_id, thinking_only=thinking_only)
        cap = self.service.settings.max_new_tokens
        if thinking_only and stats is not None and stats.finish_reason == FinishReason.LENGTH and stats.tokens < cap:
            more = min(stats.tokens * 2, cap)
            line["options"] = [{"label": f"Retry with {more} new tokens", "value": f"{MORE_TOKENS}{more}"}]
        return line

    # -- Stop, and the actions under the last reply -----------------------------------------------
    def stop(self, question_id: str, request: gr.Request) -> tuple:
        """Stop the answer to `question_id` (this tab's). A question still waiting for its turn
        ends here, drawn stopped, and the box is free at once (its answer, when its turn comes,
        finds nothing to do); an answer under way is cancelled, and draws itself stopped."""
        key = question_key(request.session_hash, question_id)
        waiting = self.waiting_questions.take(key) if key else None
        if waiting is None:
            if key is not None:
                self.questions.stop(key)
            return gr.skip(), gr.skip()
        self.questions.end(key)
        return stopped_early(waiting), self.idle

    @staticmethod
    def undo(history) -> list[dict]:
        """Take back the last question and its answer."""
        earlier, _ = split_last_user_turn(history)
        return earlier

    @staticmethod
    def edit_question(history) -> tuple:
        """The last question back in the box to be changed and sent again; its answer goes."""
        earlier, message = split_last_user_turn(history)
        return earlier, message if message is not None else gr.skip()

    def rate(self, liked: gr.LikeData) -> None:
        """Log a like, a dislike or a rating taken back, of a reply this server produced."""
        rating = RATINGS.get(liked.liked) if isinstance(liked.liked, (bool, str, type(None))) else None
        reply = self.replies.rating_to_log(reply_id_of(liked.value), rating) if rating else None
        if reply is None:
            return
        self.feedback.record(rating, reply)
        if rating != "none":
            gr.Info("Thank you: your rating was saved.")

    # -- files, when attached ---------------------------------------------------------------------
    def check_files(self, message) -> dict:
        """Check the files the moment they are attached: a refused one leaves the box at once,
        with a notice saying why, so no question is ever answered without a file it showed."""
        files = list((message or {}).get("files") or [])
        rules = self.service.rules
        kept, notices, videos = [], [], 0
        for item in files:
            path = file_path(item)
            name = Path(path).name
            is_video = is_video_path(path)
            if len(kept) >= rules.max_images:
                notices.append(f"{name} was not added: a message takes up to {rules.max_images} files.")
                continue
            if is_video and videos >= rules.max_videos:
                notices.append(f"{name} was not added: a message takes {rules.max_videos} video at most.")
                continue
            try:
                notices += [friendly_notice(n) for n in check_file(path, rules)]
            except InputError as exc:
                notices.append(f"{exc} It was not added.")
                continue
            kept.append(item)
            videos += is_video
        for notice in notices:
            if "not added" in notice:
                gr.Warning(notice)
            else:
                gr.Info(notice)
        if len(kept) == len(files):
            return gr.skip()
        return {"text": (message or {}).get("text") or "", "files": kept}

    @staticmethod
    def warn(text: str) -> None:
        """A notice the page's script found (a file refused before it was sent): the one style."""
        if isinstance(text, str) and text.strip():
            gr.Warning(text[:500])
