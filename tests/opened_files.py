"""Which files a piece of code opens, checked rather than assumed: Python's audit `open` events
(open, Path.read_bytes, os.open, ...) and safetensors' safe_open, which opens in Rust and raises
no audit event of its own."""
import os
import sys
from contextlib import contextmanager

import pytest

from minipipe.checkpoint import files, hf_gpt2

_recordings: list[list] = []


def _hook(event: str, args: tuple) -> None:
    if event == "open" and _recordings and isinstance(args[0], (str, bytes, os.PathLike)):
        _recordings[-1].append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_hook)  # a hook stays for the process's life: it records only inside opened_files


@contextmanager
def opened_files():
    """with opened_files() as opened: ... -> opened: every path opened, resolved."""
    opened: list = []
    with pytest.MonkeyPatch.context() as patch:
        for module in (files, hf_gpt2):
            def recording_safe_open(path, *args, _original=module.safe_open, **kwargs):
                opened.append(os.path.realpath(os.fspath(path)))
                return _original(path, *args, **kwargs)
            patch.setattr(module, "safe_open", recording_safe_open)
        _recordings.append(opened)
        try:
            yield opened
        finally:
            _recordings.pop()


def under(opened: list, directory) -> list:
    """The opened paths that lie in `directory` (resolved)."""
    root = os.path.realpath(directory)
    return [p for p in opened if p == root or p.startswith(root + os.sep)]
