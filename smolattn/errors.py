"""One-line errors for every command-line entry point."""
from __future__ import annotations

import os
import sys


class UserError(Exception):
    """Bad input or environment: reported as one line on stderr, exit status ``status`` (2)."""
    status = 2


class DeviceError(UserError):
    """The accelerator failed (a CUDA error: device-side assert, out of memory): the worker stops."""
    status = 3


DEVICE_ERRORS = ("CUDA error", "CUDA out of memory", "device-side assert", "CUBLAS_STATUS", "CUDNN_STATUS",
                 "cuDNN error", "NCCL error", "HIP error")


def is_device_error(e: BaseException) -> bool:
    """True for errors after which a CUDA device (and so its worker) cannot go on."""
    return type(e).__name__ == "OutOfMemoryError" or any(s in str(e) for s in DEVICE_ERRORS)


def run_cli(main, argv=None) -> None:
    """Run ``main(argv)``; turn any failure into one line on stderr and a non-zero exit.

    Set SMOLATTN_DEBUG=1 to get the traceback of unexpected errors.
    """
    prog = os.path.basename(sys.argv[0]) or "smolattn"
    try:
        code = main(argv)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.status)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the one place that turns crashes into one line
        if os.environ.get("SMOLATTN_DEBUG"):
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {e} (set SMOLATTN_DEBUG=1 for details)",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
