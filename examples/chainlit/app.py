"""Minimal Chainlit app used by chatgate's demo and end-to-end tests.

Every user message gets a reply derived from its text, streamed token by token
with `Message.stream_token`, so a client sees `stream_start` / `stream_token`
events travel through the proxy rather than one finished message. Files
attached to the message (uploaded with `POST /project/file`) are read back from
the worker's own disk and acknowledged in a second message,
"Received NAME: N bytes, sha256 HEX", so a test can tell that the upload
reached the process that runs the chat.

Run it (from this directory, in a venv with requirements.txt installed):

    chainlit run app.py --host 127.0.0.1 --port 8080 --headless
"""

import asyncio
import hashlib
from pathlib import Path

import chainlit as cl

# Pause between tokens: long enough that the stream is visibly incremental,
# short enough that a test round trip stays well under a second.
TOKEN_DELAY_SECONDS = 0.02
# A message starting with "slow " is answered at this pace instead: an answer that
# takes a few seconds, for the tests of a drain that lets answers finish.
SLOW_TOKEN_DELAY_SECONDS = 0.4


def reply_tokens(text: str) -> list[str]:
    """The reply to `text`, split into the tokens it is streamed as.

    The reply is "You said: " followed by the text upper-cased and reversed,
    one word per token (each but the last keeps its trailing space), so the
    concatenated tokens are exactly the reply and a test can compute it.
    """
    reply = "You said: " + text.upper()[::-1]
    words = reply.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


@cl.on_message
async def on_message(message: cl.Message) -> None:
    msg = cl.Message(content="")
    slow = message.content.startswith("slow ")
    for token in reply_tokens(message.content):
        await msg.stream_token(token)
        await asyncio.sleep(SLOW_TOKEN_DELAY_SECONDS if slow else TOKEN_DELAY_SECONDS)
    await msg.send()
    for element in message.elements or []:
        if getattr(element, "path", None):
            data = Path(element.path).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            await cl.Message(
                content=f"Received {element.name}: {len(data)} bytes, sha256 {digest}"
            ).send()
