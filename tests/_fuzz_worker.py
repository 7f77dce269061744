"""Child process of the reader fuzz test: load, then identify or map, one file per request.

Run as ``python _fuzz_worker.py``; reads one JSON request per line on stdin (``{"path": ...}``) and
answers one JSON line on its original stdout: ``{"status": "ok" | "xrfnb" | "escape", ...}``. Anything
the libraries print goes to stderr. The parent enforces the time limit, notices a crash (the pipe closes)
and checks that the input files did not change.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
import warnings

#: address-space cap, so a forged header cannot make the fuzz run swap the machine
MEMORY_LIMIT_BYTES = 8 << 30
#: scans up to this many pixels are also mapped (the model on every pixel), larger ones only summed
MAP_MAX_PIXELS = 64


def _handle(path: str, model) -> dict:
    import xrfnb

    stage = "load"
    try:
        obj = xrfnb.load(path)
        if isinstance(obj, xrfnb.Scan):
            try:
                stage = "sum_spectrum"
                obj.sum_spectrum()
                if obj.shape[0] * obj.shape[1] <= MAP_MAX_PIXELS:
                    stage = "map_pigments"
                    xrfnb.map_pigments(obj, model, progress=False)
            finally:
                close = getattr(getattr(obj.counts, "file", None), "close", None)
                if close is not None:
                    close()
        else:
            stage = "identify"
            model.identify(obj)
        return {"status": "ok", "kind": type(obj).__name__}
    except xrfnb.XRFNBError as exc:
        return {"status": "xrfnb", "stage": stage, "type": type(exc).__name__, "message": str(exc)[:300]}
    except BaseException as exc:  # every other exception is what the fuzz test looks for
        return {
            "status": "escape",
            "stage": stage,
            "type": type(exc).__name__,
            "message": str(exc)[:300],
            "traceback": traceback.format_exc()[-3000:],
        }


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library output (C or Python) must not mix with the answers
    sys.stdout = sys.stderr
    warnings.simplefilter("ignore")
    import xrfnb

    model = xrfnb.load_model("default", precision="float32")
    answer.write(json.dumps({"status": "ready"}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        answer.write(json.dumps(_handle(request["path"], model)) + "\n")


if __name__ == "__main__":
    main()
