"""``servesim serve`` in-process for tests: a :class:`CompletionServer` on 127.0.0.1 with its
own event loop on a background thread, the engine on another (as the command runs them)."""

from __future__ import annotations

import asyncio
import threading

from runtime.engine import LiveEngine
from runtime.runner import ModelRunner
from runtime.server import CompletionServer, ServerConfig
from runtime.tokenizer import Tokenizer
from sim.kv import BlockManager
from sim.policies import make_policy
from sim.policies.base import SchedulerConfig


def tiny_engine(net, policy: str = "continuous", kv_blocks: int = 512, block_size: int = 16,
                max_num_seqs: int = 64) -> LiveEngine:
    runner = ModelRunner(net, BlockManager(kv_blocks, block_size))
    scheduler = SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs)
    return LiveEngine(runner, make_policy(scheduler, runner.blocks))


class ServerThread:
    """``with ServerThread(engine, tokenizer, max_model_len=...) as s: s.url``."""

    def __init__(self, engine: LiveEngine, tokenizer: Tokenizer, max_model_len: int = 1024,
                 model_name: str = "tiny") -> None:
        blocks = engine.runner.blocks
        self.config = ServerConfig(model_name=model_name, max_model_len=max_model_len,
                                   vocab_size=engine.runner.model.spec.vocab_size, block_size=blocks.block_size,
                                   num_kv_blocks=blocks.num_blocks, port=0)
        self.server = CompletionServer(engine, tokenizer, self.config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"
