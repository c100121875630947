"""Autoregressive sampling through the pipeline (Transformer), forward only, one token at a time.

    tokens = generate(engine, prompt, n_new, max_context, temperature, top_k, seed, spec=spec)  # every rank

Each new token runs the context through the model's chunks in order (chunk c on stage
spec.placement[c]; a hand-off between two chunks of one rank stays in memory). The rank of the last chunk samples
(top-k, temperature, a seeded generator) and broadcasts the token to its pipeline, so every rank
returns the same tokens. Messages use the engine's activation channel.
"""
import torch
import torch.distributed as dist

from minipipe.pipeline.collectives import collective
from minipipe.pipeline.comm import ACTIVATION
from minipipe.pipeline.spec import PipelineSpec


@torch.no_grad()
def generate(engine, prompt: torch.Tensor, n_new: int, max_context: int, temperature: float = 0.8,
             top_k: int = 40, seed: int = 0, *, spec: PipelineSpec) -> torch.Tensor:
    """prompt: (1, T) ids. Returns the n_new sampled ids (on the CPU)."""
    stage, lay = engine.stage, engine.layout
    stage.eval()
    tokens = prompt.to(engine.device)
    generator = torch.Generator(device=engine.device).manual_seed(seed)
    k, placement, last_chunk = spec.n_stages, spec.placement, spec.n_chunks - 1
    samples = lay.stage == placement[last_chunk]  # this rank runs the model's last chunk
    own = spec.chunks_on(lay.stage)
    for _ in range(n_new):
        value = tokens[:, -max_context:]
        for v, c in enumerate(own):
            if c > 0 and placement[c - 1] != lay.stage:
                value = engine.comm.recv(engine.rank_of(placement[c - 1]), microbatch=0, expect_batch=1,
                                         what="generation activation", tag=ACTIVATION)
            with engine.autocast():
                value = stage(value, 0, 0, v)
            if c < last_chunk and placement[c + 1] != lay.stage:
                engine.comm.send(value, engine.rank_of(placement[c + 1]), what="generation activation",
                                 tag=ACTIVATION)
                engine.comm.wait_sends()
        if samples:
            logits = value[:, -1, :].float() / temperature
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
        else:
            token = torch.zeros(1, 1, dtype=torch.long, device=engine.device)
        if k > 1:
            collective(lay, "the sampled token's broadcast from the last stage",
                       lambda: dist.broadcast(token, src=engine.rank_of(placement[last_chunk]),
                                              group=lay.pipeline_group),
                       timeout_s=spec.timeout_s)
        tokens = torch.cat([tokens, token], dim=1)
    return tokens[0, prompt.shape[1]:].cpu()
