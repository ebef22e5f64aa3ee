"""Static instruction counts of the loss kernel's loops, compiled for sm_90 on any machine (no GPU needed).

    python benchmarks/kernel_sass.py                          # this checkout's train_gpt.py
    git show 8cd77ed:train_gpt.py > /tmp/old.py && python benchmarks/kernel_sass.py --trainer /tmp/old.py

Compiles softcap_mtp_ce_with_grad's kernel (bf16 logits, four target columns, e5m2 gradient; the default FP8
head's loss) at the trainer's launch configuration with Triton's own ptxas, disassembles it with the bundled
nvdisasm, and prints for each loop (a backward branch) its SASS instructions, MUFU (special-function unit) and
LDG (global load) counts, and the most frequent opcodes. Each loop iteration handles BLOCK / (32 x warps) columns
per thread. Arguments are specialized as at the trainer's launch (16-byte aligned pointers, ints multiples of 16).
Static counts: a branch inside a loop (the target comparisons) counts in full whether or not it runs. A guide to
what a change does to the code, not a measurement of time.
"""
import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIGNATURE = {"Z": "*bf16", "TGT": "*i64", "W": "*fp32", "ROWS": "*fp32", "DZ": "*fp8e5", "V": "i32", "stride_z": "i32",
             "stride_dz": "i32", "cap": "fp32", "offset": "fp32", "inv_temp": "fp32", "grad_mul": "fp32"}


def load_trainer(path: str):
    """The trainer module of `path`: the one already imported from that file, or a new import under the file's
    name. (A trainer registers its custom ops under its file's name: importing one file twice would register
    them twice, so compare another version under another file name, as the example above does.)"""
    path = os.path.realpath(path)
    for module in list(sys.modules.values()):
        if os.path.realpath(getattr(module, "__file__", None) or "") == path:
            return module
    name = os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules:
        sys.exit(f"error: a module named {name!r} is already imported; copy {path} to a file of another name")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def compile_for_hopper(kernel, signature: dict, constexprs: dict, warps: int) -> dict:
    """A @triton.jit kernel compiled for sm_90 (H100/H200) with Triton's own ptxas, no GPU needed: its asm by stage
    (ttir ... ptx, cubin) and "shared", the bytes of shared memory a program asks. `signature` types the runtime
    arguments; as at the trainer's launches every pointer is taken as 16-byte aligned and every int a multiple of
    16 (Triton specializes on both: vectorized loads)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    types = dict(signature, **{name: "constexpr" for name in constexprs})
    types = {name: types[name] for name in kernel.arg_names}  # in the kernel's order
    aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in signature.items() if kind.startswith("*") or kind == "i32"}
    source = ASTSource(fn=kernel, signature=types, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    return dict(compiled.asm, shared=compiled.metadata.shared)


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin, by the nvdisasm that ships with Triton."""
    import triton
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", "-g", f.name], capture_output=True, text=True, check=True).stdout


def pass_math_constexprs(trainer, pass_math=None) -> dict:
    """The loss kernel's LOSS_MATH / GRAD_MATH for the (loss pass, gradient pass) forms `pass_math` (default the
    trainer's CE_PASS_MATH); none for a trainer from before the forms existed."""
    if not hasattr(trainer, "ce_pass_math_indices"):
        if pass_math:
            sys.exit("error: this trainer's loss kernel has one form; drop --pass_math")
        return {}
    try:
        loss_math, grad_math = trainer.ce_pass_math_indices(pass_math or trainer.CE_PASS_MATH)
    except ValueError as e:
        sys.exit(f"error: --pass_math: {e}")
    return {"LOSS_MATH": loss_math, "GRAD_MATH": grad_math}


def loss_kernel_sass(trainer, pass_math=None) -> str:
    block, warps = getattr(trainer, "CE_LAUNCH", None) or (trainer.CE_BLOCK, 8)
    constexprs = {"K": 4, "BLOCK": block, "CLAMP": 57344.0, **pass_math_constexprs(trainer, pass_math)}
    return disassemble(compile_for_hopper(trainer._softcap_mtp_ce_grad_kernel, SIGNATURE, constexprs, warps)["cubin"])


def instruction(line: str) -> str | None:
    """The instruction of one line of nvdisasm's output (after its /*address*/), None if the line holds none."""
    found = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
    return found.group(1).strip() if found else None


def opcodes(cubin: bytes) -> list[str]:
    """The opcode of each instruction of the disassembled cubin, in order."""
    return [opcode(ins) for ins in map(instruction, disassemble(cubin).splitlines()) if ins]


def loops(sass: str) -> list[list[str]]:
    """The instruction lists of each loop: from a label to a later branch back to it."""
    labels, instructions = {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        ins = instruction(line)
        if ins:
            instructions.append(ins)
    bodies = []
    for i, ins in enumerate(instructions):
        target = re.search(r"BRA\s+.*?(\.L_x_\d+)", ins)
        if target and target.group(1) in labels and labels[target.group(1)] <= i:
            bodies.append(instructions[labels[target.group(1)]:i + 1])
    return bodies


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P[T\d]\s+", "", instruction).split()[0].split(".")[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trainer", default=os.path.join(ROOT, "train_gpt.py"), help="the trainer file whose kernel to count")
    ap.add_argument("--pass_math", default="", help="the loss and gradient passes' forms, 'loss,grad' (train_gpt's "
                    "CE_PASS_MATH; default the trainer's)")
    args = ap.parse_args(argv)
    pass_math = tuple(args.pass_math.split(",")) if args.pass_math else None
    rows = []
    for body in loops(loss_kernel_sass(load_trainer(args.trainer), pass_math)):
        if len(body) < 8:  # a spin or a trivial loop
            continue
        counts = collections.Counter(opcode(b) for b in body)
        rows.append(dict(instructions=len(body), mufu=counts["MUFU"], ldg=counts["LDG"], top=counts.most_common(8)))
    print(f"{args.trainer}: softcap_mtp_ce_with_grad kernel, sm_90" + (f", passes {args.pass_math}" if pass_math else ""))
    for i, r in enumerate(rows):
        top = ", ".join(f"{op} {n}" for op, n in r["top"])
        print(f"loop {i}: {r['instructions']} instructions, {r['mufu']} MUFU, {r['ldg']} LDG; {top}")
    return rows


if __name__ == "__main__":
    main()
