"""The open-loop load generator: send each request at its arrival time, stream, time stamps.

Requests go to ``/v1/completions`` with ``stream: true`` and
``stream_options.include_usage``; the client never waits for one request before sending the
next (open loop), so a slow router shows as queueing, not as a lower offered rate. With
several targets (``direct``) request *i* goes to target *i mod n*. A request counts as
completed only when its stream ended with ``[DONE]`` and delivered every requested token.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence

import aiohttp

from .metrics import RequestRecord
from .workload import WorkloadRequest

MODEL = "sim-model"


def request_body(prompt: str, max_tokens: int, model: str = MODEL) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict, record: RequestRecord) -> None:
    """Send one request and fill ``record`` (times on the running loop's clock)."""
    loop = asyncio.get_running_loop()
    record.sent = loop.time()
    chunks = 0
    usage_tokens = None
    done = False
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                record.error = f"HTTP {resp.status}: {text}"
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                now = loop.time()
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                doc = json.loads(payload)
                if "error" in doc:
                    record.error = f"stream error: {str(doc['error'])[:160]}"
                    return
                choices = doc.get("choices") or ()
                if choices and choices[0].get("text"):
                    record.chunk_times.append(now)
                    chunks += 1
                usage = doc.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
            record.end = loop.time()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
        return
    record.output_tokens = usage_tokens if usage_tokens is not None else chunks
    if not done:
        record.error = "stream ended without [DONE]"
    elif record.output_tokens != body["max_tokens"] or not chunks:
        record.error = f"got {record.output_tokens} tokens ({chunks} chunks), asked for {body['max_tokens']}"
    else:
        record.ok = True


async def drive(targets: Sequence[str], requests: Sequence[WorkloadRequest], prompts: Sequence[str], *,
                timeout_s: float = 600.0, progress: bool = True, label: str = "") -> list[RequestRecord]:
    """Replay ``requests`` open-loop against ``targets``; one record per request, in order."""
    loop = asyncio.get_running_loop()
    records = [RequestRecord(k, r.arrival_s, 0.0, r.prompt_tokens) for k, r in enumerate(requests)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=label, unit="req", file=sys.stderr, leave=False, dynamic_ncols=True)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        t0 = loop.time() + 0.05
        for k, (req, prompt) in enumerate(zip(requests, prompts)):
            records[k].scheduled = t0 + req.arrival_s
            delay = records[k].scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(stream_one(session, targets[k % len(targets)],
                                               request_body(prompt, req.output_tokens), records[k]))
            if bar is not None:
                task.add_done_callback(lambda _t: bar.update(1))
            tasks.append(task)
        await asyncio.gather(*tasks)
    if bar is not None:
        bar.close()
    return records
