"""The fingerprint of the operator's sources. setup.py records it beside the module it builds
(rot_kernel/_C.sources), and `import rot_kernel` compares it with rot_kernel/csrc, so that a
build older than its sources is said, not run in silence. The standard library only: setup.py
loads this file by its path, before the package can be imported."""
import hashlib
import os


def fingerprint(csrc):
    """sha256 (16 hex digits) over every file in csrc, names and contents, in name order."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(csrc)):
        with open(os.path.join(csrc, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:16]
