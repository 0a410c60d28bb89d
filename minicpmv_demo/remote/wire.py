"""A chat as an OpenAI-compatible server wants it, in the conventions vLLM and SGLang share.

Pictures travel as data URLs inside the messages; what the model card calls chat-template and
processor options travel as `chat_template_kwargs` / `mm_processor_kwargs`; `top_k` and
`repetition_penalty` are extra body fields. This app's own OpenAI route reads the same shape, so
another instance of it is a backend too.
"""

from __future__ import annotations

import base64
import io
from fractions import Fraction

import av

from ..intake.conversation import Conversation, PromptOptions
from ..engine import SamplingParams
from ..intake.videos import PreparedVideo

# Quality of the clip a video's sampled frames are sent as (H.264's constant-rate factor: 18 is
# visually lossless; the backend samples its frames from it).
VIDEO_CRF = "18"



def request_body(conversation: Conversation, params: SamplingParams, model: str) -> dict:
    """The `/v1/chat/completions` body (streamed) for `conversation` with `params`."""
    body = {
        "model": model,
        "messages": messages(conversation),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.top_k:
        body["top_k"] = params.top_k
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = params.repetition_penalty
    if params.seed is not None:
        body["seed"] = params.seed
    return body | prompt_options(conversation.options)


def prompt_options(options: PromptOptions) -> dict:
    """The prompt choices, only those the user made: a backend keeps its own defaults otherwise."""
    body: dict = {}
    if options.enable_thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": options.enable_thinking}
    processor = {"downsample_mode": options.downsample_mode} if options.downsample_mode != "16x" else {}
    if options.max_slice_nums is not None:
        processor["max_slice_nums"] = options.max_slice_nums
    if options.max_num_frames is not None:
        processor["max_num_frames"] = options.max_num_frames
    if processor:
        body["mm_processor_kwargs"] = processor
    return body


def messages(conversation: Conversation) -> list[dict]:
    """OpenAI chat messages: the system prompt, then each turn's pictures and text."""
    out: list[dict] = []
    if conversation.system_prompt:
        out.append({"role": "system", "content": conversation.system_prompt})
    for turn in conversation.turns:
        if turn.role == "assistant" or not (turn.images or turn.videos):
            out.append({"role": turn.role, "content": turn.text})
            continue
        content: list[dict] = [{"type": "image_url", "image_url": {"url": data_url(image.image)}}
                               for image in turn.images]
        content += [{"type": "video_url", "video_url": {"url": video_data_url(video)}} for video in turn.videos]
        if turn.text:
            content.append({"type": "text", "text": turn.text})
        out.append({"role": "user", "content": content})
    return out


def data_url(image) -> str:
    """A PIL picture as a `data:image/png;base64,...` URL.

    Pictures are sent as checked here (upright, at most 1344 px): PNG is lossless, so the backend
    sees exactly the pixels this app would have given its own model (and its caches can match).
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def video_data_url(video: PreparedVideo) -> str:
    """A video's sampled frames as a `data:video/mp4;base64,...` clip of the same duration.

    The frames were checked and sampled here (the request's frame count); the backend reads
    them back from this clip, evenly spaced as they were taken.
    """
    frames = video.frames
    width, height = frames[0].size
    even = (width - width % 2, height - height % 2)  # H.264's 4:2:0 pictures need even sides
    rate = Fraction(len(frames)) / Fraction(max(video.seconds, 1e-3)).limit_denominator(1000)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate.limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = even[0], even[1], "yuv420p"
        stream.options = {"crf": VIDEO_CRF}
        for frame in frames:
            picture = av.VideoFrame.from_image(frame.crop((0, 0, *even)))
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()
