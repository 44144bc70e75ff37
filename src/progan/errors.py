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
