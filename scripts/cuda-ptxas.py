#!/usr/bin/env python3
"""Compiles every CUDA module as compile.rs does (shared headers prepended,
the same NVRTC options) with NVRTC from PyPI, then runs ptxas on the PTX
for sm_90 and prints each kernel's registers, spills, shared memory and
size of machine code (a kernel that runs once a layer waits on fetching
its code; BENCHMARKS.md).
Catches what scripts/cuda-syntax.sh cannot (asm operands, PTX, register
pressure) on a machine without a GPU. Setup, once:
  pip install --target /tmp/cudapy nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-runtime-cu12
With --keep DIR each module's cubin is kept as DIR/MODULE.cubin, to read
its SASS with nvdisasm (`pip install --target /tmp/cudapy2
nvidia-cuda-nvdisasm`, then `/tmp/cudapy2/nvidia/cu13/bin/nvdisasm -c -fun
KERNEL DIR/MODULE.cubin`).
Usage: scripts/cuda-ptxas.py [--root /tmp/cudapy] [--keep DIR] [module ...]
"""
import argparse, ctypes, os, shutil, subprocess, sys, tempfile

SRC = os.path.join(os.path.dirname(__file__), "..", "crates", "kernels-cuda", "src")
HEADERS = ["numerics.cuh", "dependent_launch.cuh", "async_copy.cuh", "tensor_core.cuh"]
# Modules built from several files (device.rs's MODULES): the extra files first.
PARTS = {"layer": ["norm.cu", "attention.cu", "layer.cu"], "attention_tc": ["rope.cu", "attention_tc.cu"],
         "gemm_wgmma": ["rope.cu", "gemm_wgmma.cu"]}
# Modules compiled for an architecture's own features (device.rs: Hopper's
# wgmma needs sm_90a); the rest for sm_90.
ARCH = {"gemm_wgmma": "90a"}


def read(name):
    with open(os.path.join(SRC, name)) as f:
        return f.read()


def text_sizes(cubin):
    """Bytes of each kernel's .text section in a cubin (an ELF file); the
    cubin is removed afterwards."""
    sizes = {}
    try:
        out = subprocess.run(["readelf", "-S", "-W", cubin], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            names = [p for p in parts if p.startswith(".text.")]
            if names:
                i = parts.index(names[0])
                sizes[names[0][len(".text."):]] = int(parts[i + 4], 16)
    except (OSError, ValueError, IndexError):
        pass
    if os.path.exists(cubin):
        os.unlink(cubin)
    return sizes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/cudapy")
    ap.add_argument("--keep", help="keep each module's cubin in this folder")
    ap.add_argument("modules", nargs="*")
    a = ap.parse_args()
    nv = os.path.join(a.root, "nvidia")
    lib = ctypes.CDLL(os.path.join(nv, "cuda_nvrtc", "lib", "libnvrtc.so.12"))
    inc = os.path.join(nv, "cuda_runtime", "include")
    ptxas = os.path.join(nv, "cuda_nvcc", "bin", "ptxas")
    mods = a.modules or sorted(
        [f[:-3] for f in os.listdir(SRC) if f.endswith(".cu")] + [m for m in PARTS if m + ".cu" not in os.listdir(SRC)]
    )
    failed = False
    for m in mods:
        parts = PARTS.get(m, [m + ".cu"])
        src = "\n".join(read(h) for h in HEADERS) + "\n" + "\n".join(read(p) for p in parts)
        prog = ctypes.c_void_p()
        lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), (m + ".cu").encode(), 0, None, None)
        opts = [b"--ftz=false", b"--prec-sqrt=true", b"--prec-div=true", b"--fmad=false",
                f"--gpu-architecture=compute_{ARCH.get(m, '90')}".encode(), b"--std=c++17", b"-I" + inc.encode()]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            print(f"== {m}: NVRTC failed\n{log.value.decode()}")
            failed = True
            continue
        lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
        ptx = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetPTX(prog, ptx)
        with tempfile.NamedTemporaryFile("wb", suffix=".ptx", delete=False) as f:
            f.write(ptx.value)
        cubin = f.name[:-4] + ".cubin"
        r = subprocess.run([ptxas, f"-arch=sm_{ARCH.get(m, '90')}", "-v", f.name, "-o", cubin], capture_output=True, text=True)
        os.unlink(f.name)
        if a.keep and os.path.exists(cubin):
            os.makedirs(a.keep, exist_ok=True)
            shutil.copyfile(cubin, os.path.join(a.keep, m + ".cubin"))
        sizes = text_sizes(cubin)
        print(f"== {m}")
        for line in (r.stdout + r.stderr).splitlines():
            low = line.lower()
            # Warnings and performance notes too: ptxas says (C7514, an
            # info line) when it serialises a kernel's wgmma instructions.
            if ("Compiling entry" in line or "Used" in line or "spill" in line and "0 bytes spill" not in line
                    or "error" in low or "warning" in low or "performance" in low):
                print("  " + line.strip().replace("ptxas info    : ", ""))
            if "Compiling entry" in line:
                name = line.split("'")[1]
                if name in sizes:
                    print(f"  {sizes[name]} bytes of code")
        failed |= r.returncode != 0
    sys.exit(1 if failed else 0)


main()
