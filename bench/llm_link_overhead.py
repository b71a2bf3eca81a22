"""Issue 13 side-by-side: ms per generated token at RTT 0, split k=2 of stories260K, for
{old SessionLink, the one ZmqCloudLink} x {old minimal LLMServer ROUTER, the cloud service
with its session gate}, interleaved in one process (5 rounds, median).

The old pieces are read from git (``main`` before issue 13, or ``--old-ref``) into a temp dir:

    python bench/llm_link_overhead.py [--old-ref 569fe4e]
"""
import argparse, asyncio, os, subprocess, sys, tempfile, time, statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import torch
torch.set_num_threads(1)
from dataclasses import replace
from tether.cloud.llm import LLMEngine, LLMServer
from tether.core import protocol as P
from tether.edge.link import SessionReply
from tether.edge.llm import GenerateConfig, LLMEdge
from tether.edge.zmq_link import ZmqCloudLink
from tether.partitioner.llm import EdgeLM, open_llm


def _old_modules(ref: str) -> None:
    """old_link (SessionLink) and old_server (the ROUTER LLMServer) from ``ref`` into sys.path."""
    tmp = Path(tempfile.mkdtemp(prefix="tether-old-"))
    show = lambda path: subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{path}"],
                                       check=True, capture_output=True, text=True).stdout
    (tmp / "old_link.py").write_text(show("tether/edge/llm_link.py"))
    body = show("tether/cloud/llm.py")
    body = body[body.index("class LLMServer"):].replace("engine: LLMEngine", "engine")
    (tmp / "old_server.py").write_text("import asyncio\nfrom typing import Any\n"
                                       "from tether.core import protocol as P\n"
                                       "from tether.core.errors import ProtocolError\n" + body)
    sys.path.insert(0, str(tmp))

class OldAdapter:
    def __init__(self, ep): self.l = old_link.SessionLink(ep); self.endpoint = ep; self.ready = True
    def add_bundle(self, b): pass
    async def start(self): pass
    async def wait_ready(self, t): return True
    async def session(self, msg, timeout):
        reply, s, r = await self.l.call(replace(msg, request_id=self.l.next_id()), timeout)
        return SessionReply(reply, 0.0, s, r)
    async def close(self): await self.l.close()

async def run(ckpt, part, link, tokens):
    edge = LLMEdge(part, ckpt.fingerprint, ckpt.tokenizer(), GenerateConfig(timeout_s=10), link)
    [e async for e in edge.generate([1], 4, stop_at_eos=False)]      # connect + warm
    t0 = time.perf_counter()
    ev = [e async for e in edge.generate([1], tokens, stop_at_eos=False)]
    assert all(e.source == "cloud" for e in ev)
    return (time.perf_counter() - t0) / tokens * 1000

async def main():
    import old_link, old_server    # noqa: F401 (placed by _old_modules)
    globals().update(old_link=old_link, old_server=old_server)
    assets = Path(os.environ.get("TETHER_ASSETS", REPO.parent / "shared" / "assets"))
    ckpt = open_llm(assets / "tinyllm" / "stories260K.bin")
    part = EdgeLM(ckpt, 2, with_exit=False)
    res = {}
    for rep in range(5):
        for sname in ("old_server", "new_server"):
            eng = LLMEngine(ckpt, model_id="stories260K")
            srv = old_server.LLMServer(eng, "tcp://127.0.0.1:0") if sname == "old_server" else LLMServer(eng, "tcp://127.0.0.1:0")
            ep = await srv.start()
            for lname in ("old_link", "new_link"):
                link = OldAdapter(ep) if lname == "old_link" else ZmqCloudLink(ep, P.BundleInfo("s", ckpt.fingerprint))
                ms = await run(ckpt, part, link, 48)
                await link.close()
                res.setdefault((sname, lname), []).append(ms)
            await srv.close()
    for k, v in res.items():
        print(k, "ms/token median %.2f" % statistics.median(v), ["%.2f" % x for x in v])
    ratio = statistics.median(res[("new_server", "new_link")]) / \
        statistics.median(res[("old_server", "old_link")])
    print(f"one link + one core vs before: {ratio:.2f}x the time per token (RTT 0); "
          f"load {open('/proc/loadavg').read().split()[0]}")
if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-ref", default="569fe4e", help="git ref before issue 13")
    _old_modules(ap.parse_args().old_ref)
    asyncio.run(main())
