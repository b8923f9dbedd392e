"""The seeds' own system for H1-H3 (BENCH.md): FastAPI on uvicorn, the same routes as the
anyio-cpp server and the hyper peer.

  GET /async       async def on the loop: {"ok":true}
  GET /sync?ms=N   plain def: Starlette runs it through run_in_threadpool, i.e. anyio's
                   default 40-token thread limiter; it sleeps N ms, then {"ok":true}
  GET /stats       anyio's default thread limiter: borrowed_tokens, total_tokens, tasks_waiting

Run (benchmarks/http/run.sh does, with Debian's /usr/bin/python3):
  python3 -m uvicorn fastapi_app:app --app-dir benchmarks/http --port 8000 \\
      --loop uvloop --http httptools --no-access-log     # or: --loop asyncio --http h11
"""
import time

import anyio.to_thread
from fastapi import FastAPI

app = FastAPI()


@app.get("/async")
async def async_route():
    return {"ok": True}


@app.get("/sync")
def sync_route(ms: int = 0):
    time.sleep(ms / 1000)
    return {"ok": True}


@app.get("/stats")
async def stats():
    s = anyio.to_thread.current_default_thread_limiter().statistics()
    return {"borrowed_tokens": s.borrowed_tokens, "total_tokens": s.total_tokens,
            "tasks_waiting": s.tasks_waiting}
