"""Dropout seeding: a stage seeds the generator of the device its values live on, not the current
CUDA device (what torch.cuda.manual_seed seeds). Checked on the CPU with stand-in generators for
two GPUs; the same check on real GPUs is in NOTES (needs two)."""
import torch

from minipipe.pipeline import stage


def test_a_value_on_gpu_1_seeds_gpu_1s_generator_while_gpu_0_is_current(monkeypatch):
    gpus = (torch.Generator(), torch.Generator())  # stand-ins for cuda:0's and cuda:1's generators
    untouched = [g.initial_seed() for g in gpus]

    def current_device_seeded(seed):
        raise AssertionError("seeded the current device's generator")

    monkeypatch.setattr(torch.cuda, "default_generators", gpus)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "manual_seed", current_device_seeded)
    stage._seed_generators(1234, torch.device("cuda", 1))
    assert gpus[1].initial_seed() == 1234 and gpus[0].initial_seed() == untouched[0]
    assert torch.random.default_generator.initial_seed() == 1234  # CPU ops (and CPU runs) too
    stage._seed_generators(99, torch.device("cpu"))
    assert [g.initial_seed() for g in gpus] == [untouched[0], 1234]


def test_a_stage_seeds_the_device_of_the_value_it_runs_on(monkeypatch):
    seeded = []
    monkeypatch.setattr(stage, "_seed_generators", lambda seed, device: seeded.append(device))
    stage.Stage({3: torch.nn.Dropout(0.5)}, seed=1)(torch.ones(2, device="meta"), step=0, microbatch=0)
    assert seeded == [torch.device("meta")]  # not the CPU's, not a current device's
