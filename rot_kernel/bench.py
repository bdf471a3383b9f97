"""Benchmark of the fused rotation-batch operator.

    python -m rot_kernel.bench [--device cpu|cuda] [--json PATH] [--quick]

Builds RotNet training batches (shift, flip, all rotations, normalise) three ways, timed
side by side and interleaved in one run so that machine noise hits them alike:
  fused      rot_kernel.rotation_batch (the compiled op)
  reference  rot_kernel.reference.rotation_batch (plain torch: the oracle)
  original   the original RotNet loader's per-image numpy pipeline, one image at a time
Before timing, the three are checked to give the same values: a fast wrong answer is no answer.
The ImageNet-style rows crop 256x256 sources to 224x224 outputs: "crop" at random integer
offsets (size + shifts), "resized" from boxes drawn as torchvision's RandomResizedCrop draws
them (size + boxes, bilinear); the original pipeline had no such rows (its columns show "–").

Every call is made as training makes it, check_bounds=False: the index is checked once
before, not by a host sync per call. On CUDA each timing is CALLS calls queued back to back,
per call, as training queues them (one call synced alone would time its launch, not the kernel:
a 4096-image batch takes tens of microseconds); "checked ms" is one call as an untrusted
caller makes it, synced alone, its index checked on the host (a sync). The "train" row is
the call a training step makes (train.Context.batch): B = 128; on CUDA bf16 and
channels_last, on the CPU float32 and contiguous (CALLS calls there too), as training there.

Reading the table: times are medians in ms for one batch of B source images (B*R outputs);
img/s and GB/s are the fused op's (bytes = uint8 read + outputs and int64 labels written;
for crops, the h x w pixels of the output size are counted as read);
"x ref" and "x orig" are how many times faster fused is (ratios of medians). On CUDA,
"% copy" is the fused op's GB/s as a fraction of a device-to-device copy measured in this
run, i.e. how close it gets to the memory bound. An original time marked * was measured on
a subset of the batch and scaled linearly per image. Nothing here asserts a speed.
On the CPU, outputs of 100 MB and more (B=4096 and 224x224) cost mostly the page faults of
first touching freshly allocated memory, the same for every implementation.
"""
import argparse, json, time
import numpy as np
import torch
import rot_kernel
from rot_kernel import reference

MEAN, STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)  # CIFAR-10 pixel statistics, 0-255
ROTATIONS = (0, 90, 180, 270)
PAD = 4                      # shifts are in [-PAD, PAD], as the original's RandomCrop(32, padding=4)
CIFAR_POOL, LARGE_POOL, IMAGENET_POOL = 50_000, 256, 256
CROP_SOURCE, CROP_SIZE = 256, 224   # "resize 256, crop 224" of the ImageNet experiments
REPS, ORIG_REPS, WARMUP = 20, 3, 3
CALLS = 10                   # calls per timing on CUDA (and the train row's), as training queues them
CROP_REPS = 5                # the crop rows' reference takes seconds per batch on a CPU
ORIG_MAX_B = 512             # the original is slow: bigger batches are timed on this many images

def train_call(device):
    # how train.Context.batch calls the op on this device (bf16 is autocast's: CUDA only)
    cuda = device.type == "cuda"
    return dict(out_dtype=torch.bfloat16 if cuda else torch.float32, channels_last=cuda)

def cases(quick):
    out = [dict(pool="cifar", B=B, dtype=dt) for B in (128, 512, 4096)
           for dt in (torch.float32, torch.bfloat16) if not (quick and B == 4096)]
    out.append(dict(pool="cifar", B=128, train=True))  # dtype: training's on the device
    # quick: a small batch, only to see that the crop paths run
    crops = [dict(pool="imagenet", B=16 if quick else 192, dtype=torch.bfloat16, crop=crop)
             for crop in ("crop", "resized")]
    return out + crops if quick else out + [dict(pool="large", B=64, dtype=torch.float32)] + crops

def make_pool(kind, device):
    n, hw = {"cifar": (CIFAR_POOL, 32), "large": (LARGE_POOL, 224), "imagenet": (IMAGENET_POOL, CROP_SOURCE)}[kind]
    return torch.randint(0, 256, (n, 3, hw, hw), dtype=torch.uint8, device=device)

def make_inputs(pool, B):
    # what a training step draws: a slice of a permutation, random shifts and flips, on the device
    dev = pool.device
    index = torch.randperm(pool.shape[0], device=dev)[:B]
    shifts = torch.randint(-PAD, PAD + 1, (B, 2), device=dev)
    flips = torch.rand(B, device=dev) < 0.5
    return index, shifts, flips

def make_crop_inputs(pool, B, crop):
    # a 224x224 training crop of each 256x256 source: (index, shifts, flips, boxes) and the size
    dev, H, W = pool.device, pool.shape[2], pool.shape[3]
    index = torch.randperm(pool.shape[0], device=dev)[:B]
    flips = torch.rand(B, device=dev) < 0.5
    if crop == "crop":
        shifts = torch.stack([torch.randint(0, H - CROP_SIZE + 1, (B,)), torch.randint(0, W - CROP_SIZE + 1, (B,))], 1)
        return index, shifts.to(dev), flips, None
    return index, None, flips, rot_kernel.resized_crop_boxes(B, H, W).to(dev)

# ---- the original pipeline: numpy on HWC images, one at a time, then ToTensor + Normalize
def original_rotate(img, deg):
    # the original code's flips/transposes; equal to torch.rot90(chw, deg // 90, dims=(-2, -1))
    if deg == 0: return img
    if deg == 90: return np.flipud(np.transpose(img, (1, 0, 2)))
    if deg == 180: return np.fliplr(np.flipud(img))
    if deg == 270: return np.transpose(np.flipud(img), (1, 0, 2))
    raise ValueError(f"original pipeline has no {deg} degree rotation")

def original_batch(pool_hwc, index, shifts, flips, device):
    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    imgs, labels = [], []
    for i, (dy, dx), f in zip(index, shifts, flips):
        img = pool_hwc[i]
        h, w = img.shape[:2]
        img = np.pad(img, ((PAD, PAD), (PAD, PAD), (0, 0)))[PAD + dy:PAD + dy + h, PAD + dx:PAD + dx + w]
        if f: img = img[:, ::-1]
        for r, deg in enumerate(ROTATIONS):
            x = torch.from_numpy(np.ascontiguousarray(original_rotate(img, deg))).permute(2, 0, 1).float()
            imgs.append((x - mean) / std)
            labels.append(r)
    return torch.stack(imgs).to(device), torch.tensor(labels).to(device)

def as_numpy(pool, index, shifts, flips):
    # the original loader held the data as HWC numpy on the CPU; converting is not timed
    return pool.permute(0, 2, 3, 1).contiguous().cpu().numpy(), index.tolist(), shifts.tolist(), flips.tolist()

# ---- timing
def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()

def timed(fn, device):
    sync(device); t0 = time.perf_counter(); fn(); sync(device)
    return time.perf_counter() - t0

def copy_bandwidth(device, nbytes=1 << 30, reps=10):
    # device-to-device copy reads and writes every byte: the memory bound to compare with
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(WARMUP): dst.copy_(src)
    t = np.median([timed(lambda: dst.copy_(src), device) for _ in range(reps)])
    return 2 * nbytes / t

def check(pools, device):
    # the three implementations must agree before any of them is timed
    for kind, pool in pools.items():
        if kind == "imagenet":  # no original pipeline: fused against the reference
            for crop in ("crop", "resized"):
                index, shifts, flips, boxes = make_crop_inputs(pool, 8, crop)
                kw = dict(mean=MEAN, std=STD, rotations=ROTATIONS, size=(CROP_SIZE, CROP_SIZE), boxes=boxes)
                got, lab = rot_kernel.rotation_batch(pool, index, shifts, flips, **kw)
                want, want_lab = reference.rotation_batch(pool, index, shifts, flips, **kw)
                # bilinear boxes: PyTorch's CPU kernel fuses multiply-adds, ours does not
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4 if boxes is not None else 1e-5)
                torch.testing.assert_close(lab, want_lab)
            continue
        index, shifts, flips = make_inputs(pool, 8)
        want, want_lab = original_batch(*as_numpy(pool, index, shifts, flips), device)
        for call in (dict(out_dtype=torch.float32), dict(out_dtype=torch.bfloat16), train_call(device)):
            for op in (rot_kernel.rotation_batch, reference.rotation_batch):
                got, lab = op(pool, index, shifts, flips, mean=MEAN, std=STD, rotations=ROTATIONS, **call)
                torch.testing.assert_close(got, want.to(call["out_dtype"]))
                torch.testing.assert_close(lab, want_lab)

def run_case(case, pool, device, reps, orig_reps):
    B, crop, train = case["B"], case.get("crop"), case.get("train", False)
    kw = dict(mean=MEAN, std=STD, rotations=ROTATIONS, check_bounds=False,
              **(train_call(device) if train else dict(out_dtype=case["dtype"])))
    dt = kw["out_dtype"]
    if crop:  # the original pipeline had no crops: fused and reference only
        index, shifts, flips, boxes = make_crop_inputs(pool, B, crop)
        kw.update(size=(CROP_SIZE, CROP_SIZE), boxes=boxes)
        orig, orig_reps, nb, reps = None, 0, B, min(reps, CROP_REPS)
    else:
        index, shifts, flips = make_inputs(pool, B)
        nb = min(B, ORIG_MAX_B)
        args = as_numpy(pool, index[:nb], shifts[:nb], flips[:nb])
        orig = lambda: original_batch(*args, device)
    cuda = device.type == "cuda"
    calls = CALLS if train or cuda else 1

    def queued(op):  # calls back to back, each output dropped (the allocator reuses its memory)
        def run():
            for _ in range(calls):
                op(pool, index, shifts, flips, **kw)
        return run

    fused, ref = queued(rot_kernel.rotation_batch), queued(reference.rotation_batch)
    checked = lambda: rot_kernel.rotation_batch(pool, index, shifts, flips, **dict(kw, check_bounds=True))
    for _ in range(WARMUP):
        fused(); ref()
        if cuda: checked()
    if orig: orig()
    t = {"fused": [], "reference": [], "original": [], "fused_checked": []}
    for i in range(reps):  # interleaved, so drifts in clock or load hit every implementation
        t["fused"].append(timed(fused, device) / calls)
        t["reference"].append(timed(ref, device) / calls)
        if cuda: t["fused_checked"].append(timed(checked, device))
        if i < orig_reps: t["original"].append(timed(orig, device) * B / nb)
    ms = {k: 1e3 * float(np.median(v)) if v else None for k, v in t.items()}
    _, C, H, W = pool.shape
    h, w = (CROP_SIZE, CROP_SIZE) if crop else (H, W)
    R = len(ROTATIONS)
    nbytes = B * C * h * w * pool.element_size() + B * R * (C * h * w * dt.itemsize + 8)
    return dict(pool=case["pool"], crop=crop, train=train, B=B, C=C, H=H, W=W, h=h, w=w, R=R,
                out_dtype=str(dt).replace("torch.", ""), channels_last=kw.get("channels_last", False),
                check_bounds=kw["check_bounds"], calls_per_timing=calls,
                ms=ms, reps={k: len(v) for k, v in t.items()}, original_scaled_from=nb if nb < B else None,
                images_per_s=B / (ms["fused"] / 1e3), bytes=nbytes, GB_per_s=nbytes / ms["fused"] / 1e6,
                speedup_vs_reference=ms["reference"] / ms["fused"],
                speedup_vs_original=ms["original"] / ms["fused"] if ms["original"] else None)

def ratio(x):
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"

def shape(c):
    out = f"{c['H']}x{c['W']}"
    if c["train"]:
        return f"{out} train"
    return out if not c["crop"] else f"{out} {c['crop']} {c['h']}x{c['w']}"

COLUMNS = [  # (header, cell) of the printed table; "–" where the original has no such case
    ("B", lambda c: c["B"]), ("HxW", shape), ("out", lambda c: c["out_dtype"]),
    ("fused ms", lambda c: f"{c['ms']['fused']:.3f}"), ("checked ms", lambda c: f"{c['ms']['fused_checked']:.3f}"),
    ("ref ms", lambda c: f"{c['ms']['reference']:.3f}"),
    ("orig ms", lambda c: "–" if c["ms"]["original"] is None else
     f"{c['ms']['original']:.1f}" + ("*" if c["original_scaled_from"] else "")),
    ("img/s", lambda c: f"{c['images_per_s']:,.0f}"), ("GB/s", lambda c: f"{c['GB_per_s']:.2f}"),
    ("% copy", lambda c: f"{100 * c['copy_fraction']:.0f}%"),
    ("x ref", lambda c: ratio(c["speedup_vs_reference"])),
    ("x orig", lambda c: "–" if c["speedup_vs_original"] is None else ratio(c["speedup_vs_original"]))]

def print_table(res):
    cuda = res["copy_GB_per_s"] is not None
    print(f"\ndevice {res['device_name'] or res['device']} | torch {res['torch']} | threads {res['threads']}"
          f" | backend {res['backend']}" + (f" | copy {res['copy_GB_per_s']:.0f} GB/s" if cuda else ""))
    cols = [(h, f) for h, f in COLUMNS if cuda or h not in ("% copy", "checked ms")]
    print("| " + " | ".join(h for h, _ in cols) + " |\n|" + "---|" * len(cols))
    for c in res["cases"]:
        print("| " + " | ".join(str(f(c)) for _, f in cols) + " |")
    if any(c["original_scaled_from"] for c in res["cases"]):
        print(f"* original timed on {ORIG_MAX_B} images of the batch, scaled linearly per image")

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", default="rot_kernel_bench.json", help="where to write the results")
    ap.add_argument("--quick", action="store_true", help="tiny run for smoke tests: few reps, small cases only")
    a = ap.parse_args()
    device = torch.device(a.device)
    reps, orig_reps = (3, 1) if a.quick else (REPS, ORIG_REPS)
    todo = cases(a.quick)
    torch.manual_seed(0)
    pools = {k: make_pool(k, device) for k in dict.fromkeys(c["pool"] for c in todo)}
    check(pools, device)
    cuda = device.type == "cuda"
    res = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if cuda else None,
               torch=torch.__version__, threads=torch.get_num_threads(), backend=rot_kernel.backend(),
               copy_GB_per_s=copy_bandwidth(device) / 1e9 if cuda else None,
               settings=dict(mean=MEAN, std=STD, rotations=ROTATIONS, pad=PAD, reps=reps, original_reps=orig_reps,
                             warmup=WARMUP, quick=a.quick, crop_source=CROP_SOURCE, crop_size=CROP_SIZE,
                             crop_reps=min(reps, CROP_REPS)), cases=[])
    for case in todo:
        c = run_case(case, pools[case["pool"]], device, reps, orig_reps)
        if res["copy_GB_per_s"]: c["copy_fraction"] = c["GB_per_s"] / res["copy_GB_per_s"]
        res["cases"].append(c)
        print(f"done B={c['B']} {shape(c)} {c['out_dtype']}: fused {c['ms']['fused']:.3f} ms", flush=True)
    print_table(res)
    with open(a.json, "w") as f: json.dump(res, f, indent=1)
    print(f"wrote {a.json}")

if __name__ == "__main__":
    main()
