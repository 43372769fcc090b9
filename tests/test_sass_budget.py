"""The kernels' SASS held to a record (tests/sass_budget.json), no GPU needed: for every module of
cuda_src/ (family x dtype x variant), no ptxas spill at sm_80 or sm_90, registers per kernel as
recorded, and each kernel's hot-loop SASS instructions per element (gpu/bench/sass.py, sm_90) not
grown past its recorded budget. A change that is meant is re-recorded with one command,
`python -m gpu.bench.sass --record`, and the new JSON committed with it.

The CUBINs come from the NVRTC compile check's cache (tests/test_nvrtc.py compiles the same
modules with the same options; whichever runs first compiles, the other waits on its lock).
"""
from __future__ import annotations

import functools

import pytest

from gpu.bench import sass

REASON = sass.unavailable_reason()
needs_sass = pytest.mark.skipif(REASON is not None, reason=f"SASS figures unavailable: {REASON}")

MATRIX = sass.matrix()
BUDGET = sass.load_budget()
RECORD = BUDGET["modules"]


def _other_nvrtc() -> str | None:
    """Registers and instructions are those of one NVRTC: another version is not held to them."""
    from gpu._toolchain import nvrtc_version
    here = ".".join(map(str, nvrtc_version()))
    if here != BUDGET.get("nvrtc"):
        return f"recorded with NVRTC {BUDGET.get('nvrtc')}, this is NVRTC {here} (re-record: {sass.RECORD_COMMAND})"
    return None


@functools.lru_cache(maxsize=None)
def figures(label: str) -> dict:
    _, family, dtype, variant = next(m for m in MATRIX if m[0] == label)
    return sass.module_figures(family, dtype, variant)


@needs_sass
@pytest.mark.parametrize("label", [m[0] for m in MATRIX])
def test_module_keeps_to_its_record(label):
    other = _other_nvrtc()
    if other:
        pytest.skip(other)
    problems = sass.budget_problems(label, RECORD.get(label), figures(label))
    assert not problems, "\n".join(problems)


def test_the_record_covers_exactly_the_modules():
    labels = {m[0] for m in MATRIX}
    stale, new = sorted(set(RECORD) - labels), sorted(labels - set(RECORD))
    assert not stale and not new, (f"tests/sass_budget.json records {stale or 'no'} module(s) that no longer "
                                   f"exist and lacks {new or 'none'}; re-record: {sass.RECORD_COMMAND}")


def test_budget_problems_name_growth_spills_registers_and_the_command():
    rec = {"k": {"registers": {"sm_80": 40, "sm_90": 40}, "per_element": 10.0, "per_element_lean": 8.0,
                 "groups": {"LDG": 10.0}}}
    same = {"k": {"registers": {"sm_80": 40, "sm_90": 40}, "spills": {"sm_80": 0, "sm_90": 0},
                  "per_element": 9.5, "per_element_lean": 8.0, "groups": {"LDG": 9.5}}}
    assert sass.budget_problems("fam:float32", rec, same) == []     # fewer instructions: fine
    grown = {"k": {**same["k"], "per_element": 12.0}}
    grown_lean = {"k": {**same["k"], "per_element_lean": 8.5}}
    regs = {"k": {**same["k"], "registers": {"sm_80": 40, "sm_90": 48}}}
    spill = {"k": {**same["k"], "spills": {"sm_80": 0, "sm_90": 16}}}
    unknown = {"j": same["k"]}
    for now, want in ((grown, "12.0 SASS instructions per element"), (grown_lean, "8.5 SASS instructions"), (regs, "48 registers at sm_90, recorded 40"),
                      (spill, "ptxas spills (16 bytes at sm_90)"), (unknown, "fam:float32 j: no recorded")):
        problems = sass.budget_problems("fam:float32", rec, now)
        assert len(problems) == 1 and want in problems[0], problems
        if "spills" not in want:
            assert sass.RECORD_COMMAND in problems[0]


PLANTED = """
.text.k:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0030*/              @!P0 BRA `(.L_x_2) ;
        /*0040*/                   LDG.E R12, desc[UR4][R6.64] ;
        /*0050*/                   FMUL R4, R4, R12 ;
        /*0060*/                   FMUL R5, R5, R12 ;
.L_x_2:
        /*0070*/                   FADD R0, R0, R4 ;
        /*0080*/                   FADD R0, R0, R5 ;
        /*0090*/                   ISETP.GE.AND P2, PT, R3, R13, PT ;
        /*00a0*/               @P2 BRA `(.L_x_5) ;
        /*00b0*/                   FADD R0, R0, R6 ;
.L_x_5:
        /*00c0*/                   FCHK P3, R4, R5 ;
        /*00d0*/              @!P3 BRA `(.L_x_6) ;
        /*00e0*/                   MOV R6, R4 ;
        /*00f0*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath) ;
.L_x_6:
        /*0100*/                   STG.E.128 desc[UR4][R14.64], R4 ;
        /*00a0*/                   IADD3 R2, P2, R2, 0x20, RZ ;
        /*00b0*/               @P1 BRA `(.L_x_1) ;
.L_x_3:
        /*00c0*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*00d0*/                   FADD R0, R0, R4 ;
        /*00e0*/               @P3 BRA `(.L_x_3) ;
        /*00f0*/                   LDG.E.STRONG.GPU R9, desc[UR4][R10.64] ;
.L_x_4:
        /*0100*/                   LDG.E.STRONG.GPU R9, desc[UR4][R10.64] ;
        /*0110*/               @P4 BRA `(.L_x_4) ;
        /*0120*/                   EXIT ;
"""


def test_hot_loop_count_of_a_planted_loop():
    """Two 16-byte float32 loads (8 elements) a trip. Every flag's work done (a predicate set
    outside the loop: a weight load, two multiplies), the in-range work (a predicate set in the
    loop: one add), a division's slow-path call left out: 16 instructions for 8 elements; with
    the flag's branch taken, 13. The scalar tail and the spin on a .STRONG load are not hot loops."""
    (name, (instrs, labels)), = sass.functions(PLANTED).items()
    k = sass.analyze_kernel(name, instrs, labels, scalar_bytes=4)
    assert [(lp.instructions, lp.lean, lp.elements) for lp in k.loops] == [(16, 13, 8.0)]
    assert k.groups == {"LDG+STG": 2.0} and k.per_element == 2.0 and k.per_element_lean == 1.625
    half = sass.analyze_kernel(name, instrs, labels, scalar_bytes=2)     # 16 elements a trip
    assert half.per_element == 1.0 and half.per_element_lean == 0.8125


def test_registers_from_a_ptxas_report():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
           "ptxas info    : Function properties for k\n"
           "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 72 registers, used 1 barriers, 384 bytes cmem[0]\n")
    assert sass.registers(log) == {"k": {"registers": 72, "spill_stores": 8, "spill_loads": 4}}


def test_the_instruction_bound_of_the_16_bit_cross_entropy_example():
    """4096 x 128,256 elements at 47 instructions each: ~770M warp instructions, ~0.74 ms at 4
    issues per clock on 132 SMs at 1.98 GHz, whatever the bytes allow."""
    e = 4096 * 128256
    t_bytes, t_instr = sass.bound_us(e, 2 * 2 * e, 47, sass.DEVICES["H200"])
    assert 730 < t_instr < 745 and t_bytes < t_instr
    assert abs(t_bytes - 4 * e / 4300e9 * 1e6) < 1e-6


def test_bounds_of_an_op_from_its_recorded_launches():
    """The launches of a public call on the emulate backend, never run: elements of the largest
    array, bytes of the arrays that size (z read, y written), the module's instructions per element."""
    from gpu.bench import bounds
    seen = []

    def figures(label):
        seen.append(label)
        return {"softmax_warp_n32": {"per_element": 8.0}, "softmax_block": {"per_element": 8.0}}
    (ln,) = bounds.launches("softmax", (64, 1000), "", "float32", figures=figures)
    assert seen == ["softmax:float32"] and ln.module == "softmax:float32"
    assert ln.elements == 64000 and ln.nbytes == 2 * 64000 * 4 and ln.per_element == 8.0
    t_bytes, t_instr = ln.bounds(sass.DEVICES["H100 SXM"])
    assert t_instr == 64000 * 8 / 32 / (4 * 132 * 1.98e9) * 1e6 and t_bytes == 512000 / 3000e9 * 1e6


@needs_sass
def test_bounds_table_of_one_case():
    """`gpu-bench --bounds`' table: each launch with its figures from the SASS, both devices."""
    from gpu.bench import bounds
    text = bounds.table(cases=[("softmax", (64, 1000), "", "float32")])
    lines = text.splitlines()
    assert "H100 SXM instr us" in lines[0] and "H200 bytes us" in lines[0]
    (row,) = [ln for ln in lines if "softmax_warp_n32" in ln]
    want = figures("softmax:float32")["softmax_warp_n32"]["per_element"]
    assert f"{want:.1f}" in row and "predicted: sum of max" in text and "SASS of NVRTC" in text
