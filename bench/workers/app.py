"""A CPU-bound Chainlit app for bench/workers.sh: each message costs a fixed amount of pure
Python work (BENCH_WORK loop rounds; bench/workers.sh calibrates it to about 50 ms on an idle
core) done on the event loop, as a handler that parses, scores or renders in Python would.

The reply is "done <text>" once the work is done. Run it like any Chainlit app:

    BENCH_WORK=200000 chainlit run app.py --headless --host 127.0.0.1 --port 8081
"""

import os

import chainlit as cl

WORK = int(os.environ.get("BENCH_WORK", "200000"))


def burn(rounds: int) -> int:
    """A fixed amount of CPU: no sleeping, no I/O, the GIL held throughout."""
    acc = 0
    for i in range(rounds):
        acc = (acc * 31 + i) % 1_000_003
    return acc


@cl.on_message
async def on_message(message: cl.Message) -> None:
    burn(WORK)
    await cl.Message(content=f"done {message.content}").send()
