"""An edge's request path for LoRA variants: fetch what the store lacks, verify, load, serve.

``EdgeServer`` joins the pieces: an ``EdgeStore`` (the blocks on this edge), ``BlockFetcher``s
(the repository, or a neighbouring edge), and an ``AdapterServer`` holding the base in memory.
``ensure`` fetches a manifest's missing blocks (each verified by the fetcher and again by the
store before it is written) and, for a LoRA variant, adds its adapter to the server from the
stored blocks; ``serve`` then decodes requests for any loaded adapters in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from testbed.apps.caching.catalogue import Manifest, model_files
from testbed.apps.caching.delivery import BlockFetcher, FetchReport
from testbed.apps.caching.serving import AdapterServer, BatchResult, Request
from testbed.apps.caching.store import EdgeStore


@dataclass
class Ensured:
    model: str
    hit: bool  # every block was already here
    fetched_bytes: int
    report: FetchReport | None


class EdgeServer:
    def __init__(self, store: EdgeStore, server: AdapterServer | None, base_model: str) -> None:
        self.store = store
        self.server = server
        self.base_model = base_model  # the catalogue name of the base held in memory

    def missing(self, manifest: Manifest) -> list[str]:
        return [h for h in manifest.hashes() if not self.store.has(h)]

    def ensure(self, manifest: Manifest, fetcher: BlockFetcher) -> Ensured:
        """Make ``manifest``'s model servable here: fetch its missing blocks, load its adapter."""
        if manifest.kind == "lora" and manifest.base != self.base_model:
            raise ValueError(f"{manifest.name} adapts {manifest.base}; this edge serves {self.base_model}")
        if manifest.kind not in ("lora", "base"):
            raise ValueError(f"{manifest.name}: a {manifest.kind} model is not served by an adapter server")
        need = self.missing(manifest)
        sizes = {b.hash: b.bytes for b in manifest.blocks}
        # the manifest's sizes let the fetcher ask for everything in one round trip
        report = fetcher.fetch(need, [sizes[h] for h in need]) if need else None
        if manifest.kind == "lora" and manifest.name not in self.server.adapters:
            from peft import LoraConfig

            adapter_blocks = [b for b in manifest.blocks if b.part == "adapter"]
            parts = model_files(Manifest(manifest.name, manifest.kind, manifest.base, manifest.weights,
                                         manifest.generated, manifest.seed, adapter_blocks, manifest.details),
                                self.store.get)
            cfg = LoraConfig(**parts["peft_config"])
            self.server.add_adapter(manifest.name, cfg, parts["adapter"])
        return Ensured(manifest.name, not need, report.bytes if report else 0, report)

    def serve(self, requests: Sequence[Request], max_new_tokens: int,
              eos: set[int] | None = None) -> BatchResult:
        return self.server.generate(requests, max_new_tokens, eos)
