"""KVM ONE_REG id decoding against the documented formulas.

Ids are computed here from the macros' definitions, independently of
snapfmt.arm64: include/uapi/linux/kvm.h (KVM_REG_ARM64, KVM_REG_SIZE_*),
arch/arm64/include/uapi/asm/kvm.h (KVM_REG_ARM_CORE_REG, ARM64_SYS_REG,
KVM_REG_ARM_FW_REG, KVM_REG_ARM64_SVE_*) and the literal tables of
Documentation/virt/kvm/api.rst "4.68 KVM_SET_ONE_REG".
"""

import pytest

from snapfmt import arm64 as a

KVM_REG_ARM64 = 0x6000000000000000
U32, U64, U128 = 0x0020000000000000, 0x0030000000000000, 0x0040000000000000
U256, U512, U2048 = 0x0050000000000000, 0x0060000000000000, 0x0080000000000000


def ARM64_SYS_REG(op0, op1, crn, crm, op2):
    return 0x6030000000130000 | op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2


def _align(x, n):
    return (x + n - 1) // n * n


# struct kvm_regs laid out by hand from the UAPI structs (natural C alignment).
def kvm_regs_offsets():
    off = {}
    for n in range(31):
        off[f"X{n}"] = 8 * n                     # user_pt_regs.regs[n]
    off["SP"], off["PC"], off["PSTATE"] = 248, 256, 264
    end_pt_regs = 272                              # sizeof(struct user_pt_regs)
    off["SP_EL1"] = end_pt_regs
    off["ELR_EL1"] = end_pt_regs + 8
    spsr = end_pt_regs + 16
    for i, n in enumerate(("SPSR_EL1", "SPSR_ABT", "SPSR_UND", "SPSR_IRQ", "SPSR_FIQ")):
        off[n] = spsr + 8 * i
    fp = _align(spsr + 8 * 5, 16)                   # __uint128_t vregs[] forces 16-alignment
    for n in range(32):
        off[f"V{n}"] = fp + 16 * n
    off["FPSR"] = fp + 512
    off["FPCR"] = fp + 516
    return off


def KVM_REG_ARM_CORE_REG(name, size):
    return KVM_REG_ARM64 | size | 0x0010 << 16 | kvm_regs_offsets()[name] // 4


def _core_size(name):
    return U128 if name.startswith("V") else U32 if name in ("FPSR", "FPCR") else U64


@pytest.mark.parametrize("name", sorted(kvm_regs_offsets()))
def test_core_ids_from_offsetof(name):
    rid = KVM_REG_ARM_CORE_REG(name, _core_size(name))
    assert a.core_reg_id(name) == rid
    d = a.decode_reg_id(rid)
    assert d["name"] == name and d["class"] == "core" and d["valid"]
    assert d["size"] == d["expected_size"] == {U32: 4, U64: 8, U128: 16}[_core_size(name)]


# api.rst "arm64 core/FP-SIMD registers" table, copied literally.
API_RST_CORE = {
    0x6030000000100000: "X0", 0x603000000010003c: "X30", 0x603000000010003e: "SP",
    0x6030000000100040: "PC", 0x6030000000100042: "PSTATE", 0x6030000000100044: "SP_EL1",
    0x6030000000100046: "ELR_EL1", 0x6030000000100048: "SPSR_EL1",
    0x603000000010004a: "SPSR_ABT", 0x603000000010004c: "SPSR_UND",
    0x603000000010004e: "SPSR_IRQ", 0x6030000000100050: "SPSR_FIQ",
    0x6040000000100054: "V0", 0x60400000001000d0: "V31",
    0x60200000001000d4: "FPSR", 0x60200000001000d5: "FPCR",
}


@pytest.mark.parametrize("rid,name", sorted(API_RST_CORE.items()))
def test_core_ids_match_api_rst_table(rid, name):
    assert a.reg_name(rid) == name
    assert a.core_reg_id(name) == rid


def test_core_member_names_and_lookup_aliases():
    assert a.decode_reg_id(a.core_reg_id("X5"))["field"] == "regs.regs[5]"
    assert a.decode_reg_id(a.core_reg_id("V7"))["field"] == "fp_regs.vregs[7]"
    assert a.core_reg_id("regs.pc") == a.core_reg_id("pc") == 0x6030000000100040
    assert a.core_reg_id("spsr[4]") == 0x6030000000100050
    with pytest.raises(KeyError):
        a.core_reg_id("X31")


@pytest.mark.parametrize("word", [1, 0x52, 0x53, 0x55, 0xD6, 0xD7])
def test_core_offsets_that_are_not_members(word):
    # odd words of 64-bit members, the padding before fp_regs, __reserved[2] after fpcr
    d = a.decode_reg_id(KVM_REG_ARM64 | U64 | 0x0010 << 16 | word)
    assert d["class"] == "core" and not d["valid"]


SYSREGS = {
    "SCTLR_EL1": (3, 0, 1, 0, 0), "TTBR0_EL1": (3, 0, 2, 0, 0), "TTBR1_EL1": (3, 0, 2, 0, 1),
    "TCR_EL1": (3, 0, 2, 0, 2), "MAIR_EL1": (3, 0, 10, 2, 0), "VBAR_EL1": (3, 0, 12, 0, 0),
    "ESR_EL1": (3, 0, 5, 2, 0), "FAR_EL1": (3, 0, 6, 0, 0), "CONTEXTIDR_EL1": (3, 0, 13, 0, 1),
    "TPIDR_EL0": (3, 3, 13, 0, 2), "TPIDR_EL1": (3, 0, 13, 0, 4), "TPIDRRO_EL0": (3, 3, 13, 0, 3),
    "CNTKCTL_EL1": (3, 0, 14, 1, 0), "MPIDR_EL1": (3, 0, 0, 0, 5), "MIDR_EL1": (3, 0, 0, 0, 0),
    "CPACR_EL1": (3, 0, 1, 0, 2), "AFSR0_EL1": (3, 0, 5, 1, 0), "AFSR1_EL1": (3, 0, 5, 1, 1),
    "AMAIR_EL1": (3, 0, 10, 3, 0), "PAR_EL1": (3, 0, 7, 4, 0), "SP_EL0": (3, 0, 4, 1, 0),
    "CSSELR_EL1": (3, 2, 0, 0, 0), "MDSCR_EL1": (2, 0, 0, 2, 2), "DBGBCR3_EL1": (2, 0, 0, 3, 5),
    "PMEVCNTR9_EL0": (3, 3, 14, 9, 1), "ICC_PMR_EL1": (3, 0, 4, 6, 0),
    "ICC_IGRPEN1_EL1": (3, 0, 12, 12, 7), "ICC_AP1R2_EL1": (3, 0, 12, 9, 2),
}


@pytest.mark.parametrize("name", sorted(SYSREGS))
def test_sysreg_ids_and_names(name):
    rid = ARM64_SYS_REG(*SYSREGS[name])
    assert a.sysreg_id(*SYSREGS[name]) == rid
    d = a.decode_reg_id(rid)
    assert d["name"] == name and d["class"] == "sysreg" and d["size"] == 8
    assert d["op"] == list(SYSREGS[name])


def test_sysreg_literal_values():
    # values that also appear as HVF hv_sys_reg_t constants (same 16-bit packing)
    assert ARM64_SYS_REG(3, 0, 1, 0, 0) & 0xFFFF == 0xC080      # HV_SYS_REG_SCTLR_EL1
    assert a.REG_MPIDR_EL1 == 0x603000000013C005
    assert a.sysreg_encoding(3, 0, 4, 6, 0) == 0xC230            # HV_GIC_ICC_REG_PMR_EL1


def test_unknown_sysreg_uses_generic_name():
    assert a.reg_name(ARM64_SYS_REG(3, 7, 15, 15, 7)) == "S3_7_C15_C15_7"


def test_timer_ids_follow_kvm_not_the_architecture():
    # arm64 kvm.h: TIMER_CVAL and TIMER_CNT carry each other's architectural encoding
    assert a.KVM_REG_ARM_TIMER_CTL == ARM64_SYS_REG(3, 3, 14, 3, 1) == 0x603000000013DF19
    assert a.KVM_REG_ARM_TIMER_CNT == ARM64_SYS_REG(3, 3, 14, 3, 2) == 0x603000000013DF1A
    assert a.KVM_REG_ARM_TIMER_CVAL == ARM64_SYS_REG(3, 3, 14, 0, 2) == 0x603000000013DF02
    assert a.reg_name(0x603000000013DF1A) == "KVM_REG_ARM_TIMER_CNT"
    assert a.reg_name(0x603000000013DF02) == "KVM_REG_ARM_TIMER_CVAL"
    assert a.reg_name(ARM64_SYS_REG(3, 3, 14, 0, 1)) == "KVM_REG_ARM_PTIMER_CNT"
    # without the KVM override the architectural name is used (HVF)
    assert a.sysreg_name(0xDF1A) == "CNTV_CVAL_EL0"


def test_firmware_and_bitmap_ids():
    assert a.KVM_REG_ARM_PSCI_VERSION == 0x6030000000140000
    assert a.reg_name(0x6030000000140000) == "KVM_REG_ARM_PSCI_VERSION"
    assert a.reg_name(0x6030000000140002) == "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2"
    assert a.reg_name(0x6030000000160000) == "KVM_REG_ARM_STD_BMAP"
    assert a.decode_reg_id(0x6030000000140000)["class"] == "fw"


def test_demux_ccsidr():
    d = a.decode_reg_id(KVM_REG_ARM64 | U32 | 0x0011 << 16 | 0x0000 | 3)
    assert d["name"] == "CCSIDR[3]" and d["size"] == 4 and d["valid"]


def test_sve_ids():
    sve = KVM_REG_ARM64 | 0x0015 << 16
    assert a.reg_name(sve | U2048 | 0 << 5 | 0) == "Z0[0]"
    assert a.reg_name(sve | U2048 | 31 << 5 | 2) == "Z31[2]"
    assert a.reg_name(sve | U256 | 0x400 | 15 << 5) == "P15[0]"
    assert a.reg_name(sve | U256 | 0x600) == "FFR[0]"
    assert a.reg_name(sve | U512 | 0xFFFF) == "KVM_REG_ARM64_SVE_VLS"
    assert a.decode_reg_id(sve | U2048)["size"] == 256


@pytest.mark.parametrize("size_field,size", [(0, 1), (1, 2), (2, 4), (3, 8), (4, 16), (5, 32),
                                             (8, 256)])
def test_reg_size_formula(size_field, size):
    assert a.reg_size(KVM_REG_ARM64 | size_field << 52 | 0x0013 << 16) == size


def test_bad_ids_flagged():
    assert not a.decode_reg_id(0x4030000000100040)["arch_ok"]          # KVM_REG_X86
    assert not a.decode_reg_id(0x6030000100100040)["reserved_ok"]
    assert a.decode_reg_id(0x6030000000990000)["class"] == "unknown"


def test_vgic_mpidr_packing():
    # arm-vgic-v3.rst: attr[63:32] = Aff3 | Aff2 | Aff1 | Aff0 (bytes); MPIDR_EL1 has Aff3 at 39:32
    assert a.vgic_mpidr(0x80000000) == 0
    assert a.vgic_mpidr(0x80000001) == 1
    assert a.vgic_mpidr(0x0000004381020304 | 1 << 31) == 0x43020304


def test_gic_register_names_and_ranges():
    assert a.gic_reg_name(a.GICD_REGS, 0x0) == "GICD_CTLR"
    assert a.gic_reg_name(a.GICD_REGS, 0x4) == "GICD_TYPER"
    assert a.gic_reg_name(a.GICD_REGS, 0x84) == "GICD_IGROUPR1"
    assert a.gic_reg_name(a.GICD_REGS, 0x6100) == "GICD_IROUTER32[31:0]"
    assert a.gic_reg_name(a.GICD_REGS, 0x6104) == "GICD_IROUTER32[63:32]"
    assert a.gic_reg_name(a.GICD_REGS, 0x7FD8) == "GICD_IROUTER1019[31:0]"
    assert a.gic_reg_name(a.GICD_REGS, 0x7FE0) is None
    assert a.gic_reg_name(a.GICD_REGS, 0xFFE8) == "GICD_PIDR2"
    assert a.gic_irq_range(a.GICD_REGS, 0x420) == (32, 35)          # IPRIORITYR8
    assert a.gic_irq_range(a.GICD_REGS, 0xC08) == (32, 47)          # ICFGR2
    assert a.gic_irq_range(a.GICD_REGS, 0x6100 + 8 * 10) == (42, 42)
    assert a.gic_reg_name(a.GICR_REGS, 0x14) == "GICR_WAKER"
    assert a.gic_reg_name(a.GICR_REGS, 0x10080) == "GICR_IGROUPR0"
    assert a.gic_reg_name(a.GICR_REGS, 0x1041C) == "GICR_IPRIORITYR7"
    assert a.gic_reg_name(a.GICR_REGS, 0x10C04) == "GICR_ICFGR1"
    assert a.gic_reg_name(a.GITS_REGS, 0x108) == "GITS_BASER1"
    assert a.gic_attr_name({"group": 6, "attr": 0xC664}) == "ICC_CTLR_EL1"
    assert a.gic_attr_name({"group": 7, "attr": 64}) == "LINE_LEVEL[64..95]"
