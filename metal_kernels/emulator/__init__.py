"""CPU emulator for MLX ``mx.fast.metal_kernel`` bodies (for testing on Linux).

``run_kernel`` wraps a kernel body the way MLX does, adapted to the C++ shim in
``metal_shim.h``, compiles it with g++ (cached per distinct generated source)
and runs it with the threads of each threadgroup as cooperative fibers.

Wrapping follows MLX's ``write_signature`` / ``metal_kernel`` in
ml-explore/mlx ``mlx/backend/metal/custom_kernel.cpp`` (the revision with
``max_constant_array_size = 8`` and dtype suffixes in the kernel name, i.e. the
0.2x/0.3x line, current as of mlx 0.32):

* header first, then ``template <typename T, int N, bool B>`` if template args;
* ``[[kernel]] void custom_kernel_<name>[_<template hash>]_<dtype suffixes>(``;
* each input: ``const device T* name [[buffer(i)]]`` (``constant`` when it has
  fewer than 8 elements; ``const constant T& name`` when 0-d), followed by
  ``const constant int* name_shape``, ``const constant int64_t* name_strides``,
  ``const constant int& name_ndim`` only if the body contains those strings;
* each output: ``device T* name`` (``device atomic<T>*`` with atomic_outputs);
* each Metal attribute (``uint3 thread_position_in_grid [[...]]`` etc.) only if
  its name occurs in the body (not the header);
* the body, then ``}``.

Adaptations for the CPU: pointer parameters become bounds-checked
``emu::ptr<T>`` objects; ``threadgroup`` variable declarations become
``static thread_local`` storage re-poisoned (NaN / all-ones) per threadgroup;
local ``device T* p = ...`` declarations become ``auto p = ...`` so derived
pointers stay checked; the explicit template instantiation MLX appends is replaced by a direct call.

The shim implements the part of the Metal Shading Language that kernel bodies use: half
(``_Float16``) and bfloat scalars; ``vec<T, N>`` vectors (float2..4, half2..4, bfloat2..4,
int2..4, uint2..4) with Metal's swizzles (``v.zyx``, ``c.rg``, read and assigned), arithmetic,
constructors (``float4(v.xy, 0.0f, 1.0f)``) and dot / length / normalize; the metal:: math
functions; simd collectives, barriers and relaxed atomics.

Dtypes: numpy arrays; ``"bfloat16"`` buffers are passed/returned as uint16 bit
patterns.  Template values may be numpy dtypes / dtype names, ints or bools.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["metal_kernel", "run_kernel", "check_syntax", "generate_source", "EmulatorError"]

_HERE = Path(__file__).resolve().parent
_SHIM = _HERE / "metal_shim.h"
_CACHE = Path(os.environ.get("POWER_RETENTION_EMULATOR_CACHE", Path(tempfile.gettempdir()) / "metal_emu_cache"))
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX: inputs with fewer elements go in `constant`

# (MLX attribute name, Metal type) -- same list and order as MLX's metal_kernel.
_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

# dtype name -> (MLX get_type_string, numpy storage dtype)
_TYPES = {
    "float32": ("float", np.float32),
    "float16": ("float16_t", np.float16),
    "bfloat16": ("bfloat16_t", np.uint16),
    "int8": ("int8_t", np.int8),
    "int16": ("int16_t", np.int16),
    "int32": ("int32_t", np.int32),
    "int64": ("int64_t", np.int64),
    "uint8": ("uint8_t", np.uint8),
    "uint16": ("uint16_t", np.uint16),
    "uint32": ("uint32_t", np.uint32),
    "uint64": ("uint64_t", np.uint64),
    "bool": ("bool", np.bool_),
}


class EmulatorError(RuntimeError):
    """Compile error, barrier/divergence violation or out-of-bounds access."""


def _dtype_name(dt) -> str:
    if isinstance(dt, str):
        name = dt.replace("mlx.core.", "")
    else:
        name = str(dt).replace("mlx.core.", "")
        if name not in _TYPES:
            name = np.dtype(dt).name
    if name == "bool_":
        name = "bool"
    if name not in _TYPES:
        raise EmulatorError(f"unsupported dtype {dt!r}")
    return name


def _template_value(v) -> tuple[str, str]:
    """(parameter kind, value text) as MLX's write_signature/write_template."""
    if isinstance(v, (bool, np.bool_)):
        return "bool", str(int(v))  # MLX streams the bool without boolalpha
    if isinstance(v, (int, np.integer)):
        return "int", str(int(v))
    return "typename", _TYPES[_dtype_name(v)][0]


_TG_DECL = re.compile(r"(?<=[;{}])(\s*)threadgroup\s+([^;(){}]*?)\s*;")


def _rewrite_threadgroup(code: str) -> str:
    """`threadgroup T x[N];` -> shared static storage poisoned per threadgroup.

    Only statement-level declarations (after `;`, `{` or `}`) are rewritten;
    `threadgroup T*` parameters keep the empty macro.  Declarations with
    several declarators (`threadgroup float a[4], b[4];`) are not supported.
    """

    def sub(m):
        decl = m.group(2)
        name = re.match(r"^.*?(\w+)\s*(\[.*\])?\s*(=.*)?$", decl, re.S).group(1)
        return f"{m.group(1)}static thread_local {decl}; ::emu::tg_poison(&{name}, sizeof({name}));"

    return _TG_DECL.sub(sub, "{" + code)[1:]


_PTR_DECL = re.compile(
    r"\b(?:const\s+)?(?:device|constant)\s+(?:const\s+)?[\w:]+(?:<[^<>;]*>)?\s*\*\s*(\w+)\s*=(?!=)")


def _rewrite_pointer_locals(code: str) -> str:
    """`const device T* p = buf + k;` -> `auto p = buf + k;`.

    Keeps pointers derived from a buffer parameter bounds-checked (they stay
    `emu::ptr`).  Pointers declared without an initialiser, or passed to
    helper functions taking raw `device T*`, degrade to unchecked raw pointers.
    """
    return _PTR_DECL.sub(r"auto \1 =", code)


def _parameters(input_names, inputs, input_dtypes, output_names, output_dtypes, shape_infos,
                attributes, atomic_outputs, binding=None):
    """(declaration in the kernel's signature, argument the runner passes) of every kernel
    parameter, in MLX's order: one list, so that the two can never disagree. ``binding``
    ("device" or "constant"): the address-space check's build, with raw pointers in that
    address space for every array input instead of MLX's choice by size and the
    bounds-checked wrappers (its arguments are the parameter names)."""
    pairs = []

    def buffer_pointer(t, loc, name, wrapper):
        # `const device float* a` as Metal writes it: the const is the pointee's, once.
        pointer = f"{loc} {t.removeprefix('const ') if loc.startswith('const') else t}*"
        if binding:
            return (f"  {pointer} {name}", name)
        return (f"  {loc} ::emu::ptr<{t}> {name} /* {pointer} [[buffer]] */", wrapper)

    for i, (n, arr, dt) in enumerate(zip(input_names, inputs, input_dtypes)):
        t = _TYPES[_dtype_name(dt)][0]
        loc = binding or ("constant" if arr.size < MAX_CONSTANT_ARRAY_SIZE else "device")
        buffer = f"g_in[{i}]"
        if arr.ndim == 0:
            pairs.append((f"  const {loc} {t}& {n} /* [[buffer]] */",
                          n if binding else f"*reinterpret_cast<const {t}*>({buffer}.data.data())"))
            continue
        pairs.append(buffer_pointer(f"const {t}", f"const {loc}", n,
                                    f"::emu::ptr<const {t}>{{reinterpret_cast<const {t}*>({buffer}.data.data()), "
                                    f"{buffer}.n, 0, \"{n}\"}}"))
        has_shape, has_strides, has_ndim = shape_infos[i]
        if has_shape:
            pairs.append(buffer_pointer("const int", "const constant", f"{n}_shape",
                                        f"::emu::ptr<const int>{{{buffer}.shape.data(), {buffer}.ndim, 0, \"{n}_shape\"}}"))
        if has_strides:
            pairs.append(buffer_pointer("const int64_t", "const constant", f"{n}_strides",
                                        f"::emu::ptr<const int64_t>{{{buffer}.strides.data(), {buffer}.ndim, 0, "
                                        f"\"{n}_strides\"}}"))
        if has_ndim:
            pairs.append((f"  const constant int& {n}_ndim", f"{n}_ndim" if binding else f"{buffer}.ndim"))
    for i, (n, dt) in enumerate(zip(output_names, output_dtypes)):
        t = _TYPES[_dtype_name(dt)][0]
        if atomic_outputs:
            t = f"atomic<{t}>"
        pairs.append(buffer_pointer(t, "device", n,
                                    f"::emu::ptr<{t}>{{reinterpret_cast<{t}*>(g_out[{i}].data.data()), "
                                    f"g_out[{i}].n, 0, \"{n}\"}}"))
    for a, t in attributes:
        pairs.append((f"  {t} {a} /* [[{a}]] */", a if binding else f"at.{a}"))
    return pairs


def generate_source(name, input_names, output_names, source, inputs, output_dtypes,
                    template=None, header="", atomic_outputs=False, input_dtypes=None,
                    binding=None):
    """Return (kernel_name, template_def, wrapped C++ source, shape_infos, attributes).
    ``input_dtypes`` overrides the inputs' numpy dtypes (bfloat16 travels as uint16).
    ``binding``: the address-space check's build (see ``_parameters``), where threadgroup
    arrays keep their address space and pointers their declared types."""
    input_dtypes = [a.dtype for a in inputs] if input_dtypes is None else input_dtypes
    template = list(template or [])
    tvals = [(n, *_template_value(v)) for n, v in template]
    kernel_name = "custom_kernel_" + name
    template_def = ""
    if tvals:
        template_def = "<" + ", ".join(v for _, _, v in tvals) + ">"
        h = re.sub(r"<|>|(, )", "_", template_def)[:-1]
        kernel_name += "_" + h
    for arr, dt in zip(inputs, input_dtypes):
        kernel_name += "_" + _TYPES[_dtype_name(dt)][0]
        if arr.ndim == 0:
            kernel_name += "s"
        elif arr.size < MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    for dt in output_dtypes:
        kernel_name += "_" + _TYPES[_dtype_name(dt)][0]

    shape_infos = [(n + "_shape" in source, n + "_strides" in source, n + "_ndim" in source)
                   for n in input_names]
    attributes = [(a, t) for a, t in _ATTRIBUTES if a in source]

    rewrite = _static_threadgroup if binding else (
        lambda code: _rewrite_pointer_locals(_rewrite_threadgroup(code)))
    src = rewrite(header) + "\n"
    if tvals:
        src += "template <" + ", ".join(f"{k} {n}" for n, k, _ in tvals) + ">\n"
    params = [declaration for declaration, _ in _parameters(
        input_names, inputs, input_dtypes, output_names, output_dtypes, shape_infos, attributes,
        atomic_outputs, binding)]
    src += f"[[kernel]] void {kernel_name}(\n" + ",\n".join(params) + ") {\n"
    src += rewrite(source) + "\n}\n"
    return kernel_name, template_def, src, shape_infos, attributes


def _static_threadgroup(code: str) -> str:
    """`threadgroup T x[N];` -> `static threadgroup T x[N];`: C++ has no automatic variables
    in an address space, so the check gives the array static storage and keeps its type."""
    return _TG_DECL.sub(lambda m: f"{m.group(1)}static threadgroup {m.group(2)};", "{" + code)[1:]


def _runner_source(kernel_name, template_def, kernel_src, input_names, inputs, input_dtypes,
                   output_names, output_dtypes, shape_infos, attributes, atomic_outputs,
                   only_kernel_warns=False):
    """main(): read spec + raw buffers, run the grid, write raw outputs. ``only_kernel_warns``:
    clang's C++17-extension warnings are silenced outside the kernel's own code (the shim
    and the runner), for the language-version check."""
    quiet, loud = (["#pragma clang diagnostic push",
                    '#pragma clang diagnostic ignored "-Wc++17-extensions"'],
                   ["#pragma clang diagnostic pop"]) if only_kernel_warns else ([], [])
    L = [*quiet, '#include "metal_shim.h"', *loud, "#line 1 \"kernel\"", kernel_src, *quiet,
         "namespace {"]
    L.append("struct Buf { std::vector<char> data; long long n; std::vector<int> shape; std::vector<int64_t> strides; int ndim; };")
    L.append(f"Buf g_in[{max(len(inputs), 1)}]; Buf g_out[{len(output_names)}];")
    args = [argument for _, argument in _parameters(
        input_names, inputs, input_dtypes, output_names, output_dtypes, shape_infos, attributes,
        atomic_outputs)]
    L.append("void launch(const ::emu::ThreadAttrs& at) {")
    L.append(f"  {kernel_name}{template_def}({', '.join(args)});")
    L.append("}")
    L.append("""
void read_file(const char* path, std::vector<char>& d) {
  FILE* f = std::fopen(path, "rb"); if (!f) ::emu::fail("cannot open buffer file");
  if (!d.empty() && std::fread(d.data(), 1, d.size(), f) != d.size()) ::emu::fail("short buffer file");
  std::fclose(f);
}
}  // namespace
int main(int argc, char** argv) {
  if (argc != 2) ::emu::fail("usage: runner SPEC");
  FILE* s = std::fopen(argv[1], "r");
  char order[16]; unsigned seed, grid[3], tg[3];
  if (std::fscanf(s, "%15s %u %u %u %u %u %u %u", order, &seed, grid, grid + 1, grid + 2, tg, tg + 1, tg + 2) != 8) ::emu::fail("bad spec");
  char path[4096];""")
    L.append(f"  for (int i = 0; i < {len(inputs)}; ++i) {{")
    L.append("""    Buf& b = g_in[i]; long long nbytes;
    if (std::fscanf(s, "%4095s %lld %lld %d", path, &nbytes, &b.n, &b.ndim) != 4) ::emu::fail("bad spec input");
    b.shape.resize(b.ndim); b.strides.resize(b.ndim);
    for (int d = 0; d < b.ndim; ++d) if (std::fscanf(s, "%d", &b.shape[d]) != 1) ::emu::fail("bad spec shape");
    for (int d = b.ndim - 1, st = 1; d >= 0; st *= b.shape[d], --d) b.strides[d] = st;  // row contiguous
    b.data.resize(nbytes); read_file(path, b.data);
  }""")
    L.append(f"  for (int i = 0; i < {len(output_names)}; ++i) {{")
    L.append("""    Buf& b = g_out[i]; long long nbytes;
    if (std::fscanf(s, "%4095s %lld %lld", path, &nbytes, &b.n) != 3) ::emu::fail("bad spec output");
    b.data.resize(nbytes); read_file(path, b.data);  // pre-filled by Python (NaN / sentinel / init_value)
  }
  std::fclose(s);
  std::string o = order;
  ::emu::Order ord = o == "reverse" ? ::emu::REVERSE : o == "random" ? ::emu::RANDOM : ::emu::FORWARD;
  ::emu::run_grid(launch, grid, tg, ord, seed);""")
    L.append(f"  for (int i = 0; i < {len(output_names)}; ++i) {{")
    L.append("""    std::string p = std::string(argv[1]) + ".out" + std::to_string(i);
    FILE* f = std::fopen(p.c_str(), "wb");
    std::fwrite(g_out[i].data.data(), 1, g_out[i].data.size(), f); std::fclose(f);
  }
  return 0;
}""")
    return "\n".join(L).replace('#include "metal_shim.h"', '#include <string>\n#include "metal_shim.h"', 1)


def _compile(kernel_label: str, cpp: str) -> Path:
    key = hashlib.sha256((cpp + _SHIM.read_text()).encode()).hexdigest()[:24]
    if _CACHE.is_file():
        raise ValueError(f"POWER_RETENTION_EMULATOR_CACHE={_CACHE} is a file; expected a directory "
                         f"(or a path that does not exist yet) for the compiled kernels")
    _CACHE.mkdir(parents=True, exist_ok=True)
    exe = _CACHE / f"k_{key}"
    if exe.exists():
        return exe
    src = _CACHE / f"k_{key}.cpp"
    src.write_text(cpp)
    tmp = _CACHE / f"k_{key}.{os.getpid()}.tmp"
    cmd = ["g++", "-O1", "-std=c++17", "-pthread", "-Wno-attributes", f"-I{_HERE}",
           str(src), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise EmulatorError(f"kernel '{kernel_label}' failed to compile:\n{r.stderr}")
    os.replace(tmp, exe)  # atomic: concurrent sessions never see a partial binary
    return exe


def _fill(dtype_name: str, shape, init_value):
    storage = _TYPES[dtype_name][1]
    if init_value is not None:
        if dtype_name == "bfloat16":
            bits = np.asarray(init_value, np.float32).view(np.uint32) >> 16
            return np.full(shape, bits, np.uint16)
        return np.full(shape, init_value, storage)
    if dtype_name in ("float32", "float16"):
        return np.full(shape, np.nan, storage)
    # bfloat NaN and integer sentinel: all-ones bytes (-1 / max value).
    return np.full(shape, -1, np.int64).astype(storage) if storage != np.bool_ else np.zeros(shape, np.bool_)


def run_kernel(name, input_names, output_names, source, inputs, output_shapes, output_dtypes,
               grid, threadgroup, template=None, order="forward", header="", *,
               init_value=None, atomic_outputs=False, seed=0, input_dtypes=None):
    """Run a Metal kernel body on the CPU; returns the outputs as numpy arrays.

    ``order``: "forward", "reverse" or "random" (threadgroups and, between
    barriers, the threads of a group run in that order; ``seed`` for random).
    Outputs start as NaN (floats) / all-ones (integers) unless ``init_value``.
    ``input_dtypes``: the inputs' dtypes where the numpy storage differs ("bfloat16" inputs
    are uint16 bit patterns).
    """
    if order not in ("forward", "reverse", "random"):
        raise ValueError(f"order must be forward, reverse or random, not {order!r}")
    if not (len(input_names) == len(inputs) and len(output_names) == len(output_shapes) == len(output_dtypes)):
        raise ValueError("names, inputs, output_shapes and output_dtypes lengths disagree")
    inputs = [np.asarray(a) for a in inputs]
    # (np.ascontiguousarray would turn 0-d scalars into 1-d arrays)
    inputs = [a if a.flags.c_contiguous else a.copy() for a in inputs]
    input_dtypes = [a.dtype for a in inputs] if input_dtypes is None else input_dtypes
    kname, tdef, ksrc, shape_infos, attrs = generate_source(
        name, input_names, output_names, source, inputs, output_dtypes, template, header,
        atomic_outputs, input_dtypes)
    cpp = _runner_source(kname, tdef, ksrc, input_names, inputs, input_dtypes,
                         output_names, output_dtypes,
                         shape_infos, attrs, atomic_outputs)
    exe = _compile(name, cpp)
    names = [_dtype_name(dt) for dt in output_dtypes]
    with tempfile.TemporaryDirectory(prefix="metal_emu_") as d:
        spec = [order, str(seed), *map(str, (tuple(grid) + (1, 1, 1))[:3]), *map(str, (tuple(threadgroup) + (1, 1, 1))[:3])]
        for i, a in enumerate(inputs):
            p = os.path.join(d, f"in{i}")
            a.tofile(p)
            spec += [p, str(a.nbytes), str(a.size), str(a.ndim), *map(str, a.shape)]
        for i, (shape, dn) in enumerate(zip(output_shapes, names)):
            p = os.path.join(d, f"out{i}")
            o = _fill(dn, tuple(shape), init_value)
            o.tofile(p)
            spec += [p, str(o.nbytes), str(o.size)]
        spec_path = os.path.join(d, "spec")
        Path(spec_path).write_text(" ".join(spec) + "\n")
        r = subprocess.run([str(exe), spec_path], capture_output=True, text=True)
        if r.returncode != 0:
            msg = "\n".join(l[len("EMU_ERROR: "):] for l in r.stderr.splitlines() if l.startswith("EMU_ERROR: "))
            if not msg:
                msg = f"runner exited with status {r.returncode}: {r.stderr.strip()}"
            raise EmulatorError(f"kernel '{name}': {msg}")
        outs = []
        for i, (shape, dn) in enumerate(zip(output_shapes, names)):
            outs.append(np.fromfile(spec_path + f".out{i}", _TYPES[dn][1]).reshape(tuple(shape)))
    return outs


def _to_numpy(x) -> np.ndarray:
    import mlx.core as mx

    if isinstance(x, mx.array):
        return np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)
    return np.asarray(x)


def _to_mlx(x: np.ndarray, dtype):
    import mlx.core as mx

    out = mx.array(x)
    return out.view(mx.bfloat16) if _dtype_name(dtype) == "bfloat16" else out


def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, compile_options=None, *, order="forward", seed=0):
    """The emulator's ``mx.fast.metal_kernel``: same arguments, and the returned kernel takes
    the same call arguments (mlx arrays in, mlx arrays out), so dispatch code written for
    Metal runs unchanged on the CPU. ``order`` and ``seed`` are as in ``run_kernel``;
    ``compile_options`` (Metal's math mode) has no CPU counterpart: IEEE math throughout."""
    if not ensure_row_contiguous:
        raise EmulatorError("the emulator passes every input row contiguous "
                            "(ensure_row_contiguous=False is not emulated)")

    def kernel(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
               init_value=None, verbose=False, stream=None):
        outputs = run_kernel(name, list(input_names), list(output_names), source,
                             [_to_numpy(x) for x in inputs], [tuple(s) for s in output_shapes],
                             list(output_dtypes), grid, threadgroup, template, order, header,
                             init_value=init_value, atomic_outputs=atomic_outputs, seed=seed,
                             input_dtypes=[x.dtype for x in inputs])
        return [_to_mlx(out, dtype) for out, dtype in zip(outputs, output_dtypes)]

    return kernel


def check_syntax(name, input_names, output_names, source, header="", *, inputs, output_dtypes,
                 template=None, compiler="clang++", binding=None, **launch):
    """Compile the program ``run_kernel`` would build with another compiler, syntax only (the
    template instantiated, nothing run): catches what g++ lets through. Takes the kernel's
    definition and the call arguments of ``metal_kernel`` (grid and the rest are ignored).
    The kernel's own code is held to C++14 (C++17 features are errors): MLX compiles kernels
    as Metal 3.1, C++14-based, on macOS 14.

    ``binding`` ("device" or "constant"): instead, check address spaces as Apple's compiler
    does. device, constant and threadgroup become distinct pointer types (clang address
    spaces), every array input is bound in ``binding`` (MLX binds inputs of fewer than 8
    elements as constant, the rest as device), and a pointer that would cross from one to
    another (a threadgroup array passed to a helper taking device memory) is an error.
    Raises EmulatorError with the compiler's message."""
    arrays = [_to_numpy(x) for x in inputs]
    dtypes = [x.dtype for x in inputs]
    wrapped = generate_source(name, list(input_names), list(output_names), source, arrays,
                              list(output_dtypes), template, header, False, dtypes, binding)
    kernel_name, template_def, kernel_source, shape_infos, attributes = wrapped
    if binding is None:
        program = _runner_source(kernel_name, template_def, kernel_source, list(input_names),
                                 arrays, dtypes, list(output_names), list(output_dtypes),
                                 shape_infos, attributes, False, only_kernel_warns=True)
    else:
        parameters = _parameters(list(input_names), arrays, dtypes, list(output_names),
                                 list(output_dtypes), shape_infos, attributes, False, binding)
        program = "\n".join([
            "#pragma clang diagnostic push", '#pragma clang diagnostic ignored "-Wc++17-extensions"',
            "#define EMU_ADDRESS_SPACES", '#include "metal_shim.h"', "#pragma clang diagnostic pop",
            '#line 1 "kernel"', kernel_source,
            "void instantiate(\n" + ",\n".join(declaration for declaration, _ in parameters) + ") {",
            f"  {kernel_name}{template_def}({', '.join(argument for _, argument in parameters)});",
            "}"])
    with tempfile.TemporaryDirectory(prefix="metal_emu_") as d:
        path = Path(d) / "kernel.cpp"
        path.write_text(program)
        # EMU_SYNTAX_ONLY: a stand-in half type where the compiler has no _Float16 (clang 14).
        result = subprocess.run([compiler, "-fsyntax-only", "-std=c++14", "-Werror=c++17-extensions",
                                 "-Wno-attributes", "-DEMU_SYNTAX_ONLY", f"-I{_HERE}", str(path)],
                                capture_output=True, text=True)
    if result.returncode != 0:
        check = "syntax check" if binding is None else f"address-space check ({binding} inputs)"
        raise EmulatorError(f"kernel '{name}' fails {compiler}'s {check}:\n"
                            f"{result.stderr[-3000:]}")
