"""The one exception type users see: a one-line message naming the file or key and what to do."""


class ProganError(Exception):
    """A user-facing error. The CLI prints `str(err)` on one line and exits 1 (traceback only with --debug)."""


def out_of_memory_error(err: BaseException, where: str, key: str, value, command: str, kept: str) -> ProganError:
    """The one message for torch.cuda.OutOfMemoryError: where it happened, which param to lower (with its value),
    the command to run again, and what is kept. `err`'s long text is cut to its "Tried to allocate ..." part."""
    import re

    text = str(err)
    m = re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", text)
    detail = m.group(0) if m else (text.splitlines()[0][:120] if text else type(err).__name__)
    return ProganError(f"{where}: CUDA out of memory ({detail}); lower {key} (now {value}) in params.yaml and run "
                       f"`{command}` again; {kept}")


def cpu_out_of_memory(err: BaseException) -> str | None:
    """A short text for a failed CPU allocation ("Unable to allocate 7.28 TiB for an array with shape ...", torch's
    "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes"), else None. The caller's one line
    names the params key or file that sized it."""
    import re

    text = " ".join(str(err).split())
    if isinstance(err, MemoryError):
        return text[:120] or "MemoryError"
    if isinstance(err, RuntimeError) and "can't allocate memory" in text:
        m = re.search(r"you tried to allocate \d+ bytes", text)
        return m.group(0) if m else text[:120]
    return None


def torch_load_failure(err: BaseException) -> tuple[str | None, str, bool]:
    """What a failed `torch.load(..., weights_only=True)` means: (the global the weights_only unpickler refused to
    import, or None; a short reason for one line; whether the weights_only unpickler itself stopped, e.g. at an
    opcode it does not read). torch.load raises many types for a bad file (KeyError for a text file,
    RuntimeError for a cut zip, UnpicklingError from the safe unpickler)."""
    import re

    text = " ".join(str(err).split())
    blocked = re.search(r"unsupported GLOBAL (\S+)", text)
    if blocked:
        return blocked.group(1), "pickled objects or code that weights_only loading does not allow", True
    inner = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    if inner:
        return None, inner.group(1), True
    first_line = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return None, (first_line if first_line and not isinstance(err, LookupError) else type(err).__name__), False


def refused_code_error(path, blocked: str, what: str, fix: str = "") -> ProganError:
    """The one message for a file whose pickle imports code (refused by weights_only loading)."""
    return ProganError(f"{path}: refused: it holds pickled objects or code ({blocked}) that weights_only loading "
                       f"does not allow; it is not a {what} (do not load untrusted files)" + (f"; {fix}" if fix else ""))
