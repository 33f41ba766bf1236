"""aarch64 sections: KVM vCPU state (ONE_REG), GICv3/GICv2 (KVM device attributes),
and the macOS Hypervisor.framework variants.

No aarch64 machine was available when this was written: every encoding below
comes from the documentation and UAPI headers named next to it:

* ``api.rst``  -- Linux Documentation/virt/kvm/api.rst, section "4.68
  KVM_SET_ONE_REG" (the arm64 register id tables) and "4.82 KVM_ARM_VCPU_INIT";
* ``uapi kvm.h`` -- include/uapi/linux/kvm.h (KVM_REG_ARM64, KVM_REG_SIZE_*);
* ``arm64 kvm.h`` -- arch/arm64/include/uapi/asm/kvm.h (struct kvm_regs,
  KVM_REG_ARM_CORE/DEMUX/SYSREG/FW/SVE/FW_FEAT_BMAP, KVM_DEV_ARM_VGIC_*);
* ``arm-vgic-v3.rst`` / ``arm-vgic.rst`` / ``arm-vgic-its.rst`` --
  Documentation/virt/kvm/devices/, "Groups" sections;
* ``GICv3 spec`` -- Arm IHI 0069 (GIC architecture specification v3/v4),
  chapter 12 "Programmers' model", register maps of the Distributor (GICD_*),
  Redistributor (GICR_*, RD_base and SGI_base frames) and ITS (GITS_*);
  ``GICv2 spec`` -- Arm IHI 0048B chapter 4 "Programmers' Model";
* ``Arm ARM`` -- Arm Architecture Reference Manual (DDI 0487), system register
  encodings (op0, op1, CRn, CRm, op2);
* ``HVF`` -- Apple Hypervisor.framework documentation and <Hypervisor/hv_vcpu_types.h>,
  <Hypervisor/hv_gic_types.h> (hv_reg_t, hv_sys_reg_t, hv_simd_fp_reg_t,
  hv_gic_icc_reg_t, hv_gic_state_get_data).

Section kinds (all little-endian; every byte is declared so decode/encode
round-trip byte-identically):

================== ===== ============================================================
name               scope content
================== ===== ============================================================
arm64.vcpu_init    vcpu  struct kvm_vcpu_init (target, features[7])
arm64.mp_state     vcpu  struct kvm_mp_state + 4 reserved bytes
arm64.regs         vcpu  count + (ONE_REG id, 16-byte value) records
arm64.hvf_vcpu     vcpu  HVF hv_reg_t / hv_sys_reg_t / hv_simd_fp_reg_t arrays + vtimer
arm64.gicv3        vm    KVM_DEV_TYPE_ARM_VGIC_V3 (+ ITS) device attributes
arm64.gicv2        vm    KVM_DEV_TYPE_ARM_VGIC_V2 device attributes
arm64.gic_blob     vm    hv_gic_state_get_data blob + per-vCPU ICC registers (HVF)
================== ===== ============================================================
"""

from __future__ import annotations

from typing import Any, Callable

import construct as c
import numpy as np

from . import typeids
from .decl import HexBytes, dtype_of
from .errors import EncodeError, FormatError, LimitError
from .registry import SCOPE_VCPU, SCOPE_VM, SectionKind, _clean, register

ARCH = "aarch64"

# =============================================================================
# KVM ONE_REG id encoding
# =============================================================================
# uapi kvm.h: KVM_REG_ARCH_MASK, KVM_REG_ARM64, KVM_REG_SIZE_SHIFT/MASK, KVM_REG_SIZE_U*.
KVM_REG_ARCH_MASK = 0xFF00000000000000
KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0000000000000
KVM_REG_SIZE_U8 = 0x0000000000000000
KVM_REG_SIZE_U16 = 0x0010000000000000
KVM_REG_SIZE_U32 = 0x0020000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_SIZE_U128 = 0x0040000000000000
KVM_REG_SIZE_U256 = 0x0050000000000000
KVM_REG_SIZE_U512 = 0x0060000000000000
KVM_REG_SIZE_U1024 = 0x0070000000000000
KVM_REG_SIZE_U2048 = 0x0080000000000000

# arm64 kvm.h: coprocessor field and its values.
KVM_REG_ARM_COPROC_MASK = 0x000000000FFF0000
KVM_REG_ARM_COPROC_SHIFT = 16
KVM_REG_ARM_CORE = 0x0010 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM_DEMUX = 0x0011 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SYSREG = 0x0013 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM_FW = 0x0014 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SVE = 0x0015 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM_FW_FEAT_BMAP = 0x0016 << KVM_REG_ARM_COPROC_SHIFT

COPROC_NAMES = {0x0010: "core", 0x0011: "demux", 0x0013: "sysreg", 0x0014: "fw",
                0x0015: "sve", 0x0016: "fw_feat_bmap"}

# arm64 kvm.h: KVM_REG_ARM_DEMUX_* (cache size id registers selected by CSSELR).
KVM_REG_ARM_DEMUX_ID_MASK = 0xFF00
KVM_REG_ARM_DEMUX_ID_SHIFT = 8
KVM_REG_ARM_DEMUX_ID_CCSIDR = 0x00 << KVM_REG_ARM_DEMUX_ID_SHIFT
KVM_REG_ARM_DEMUX_VAL_MASK = 0x00FF

# arm64 kvm.h: KVM_REG_ARM64_SYSREG_{OP0,OP1,CRN,CRM,OP2}_{MASK,SHIFT}.
SYSREG_OP0_SHIFT, SYSREG_OP0_MASK = 14, 0xC000
SYSREG_OP1_SHIFT, SYSREG_OP1_MASK = 11, 0x3800
SYSREG_CRN_SHIFT, SYSREG_CRN_MASK = 7, 0x0780
SYSREG_CRM_SHIFT, SYSREG_CRM_MASK = 3, 0x0078
SYSREG_OP2_SHIFT, SYSREG_OP2_MASK = 0, 0x0007

# arm64 kvm.h: KVM_REG_ARM64_SVE_* (ids only; see VALUE_SLOT below).
KVM_REG_ARM64_SVE_ZREG_BASE = 0
KVM_REG_ARM64_SVE_PREG_BASE = 0x400
KVM_REG_ARM64_SVE_FFR_BASE = 0x600
KVM_REG_ARM64_SVE_VLS_INDEX = 0xFFFF

#: Bytes of value stored per ONE_REG record; ids with a larger KVM_REG_SIZE
#: (the SVE Z/P/FFR/VLS registers: U2048/U256/U512) do not fit: validate reports
#: them (arm64-reg-size-unsupported).
VALUE_SLOT = 16
#: KVM_REG_SIZE encodings a record may carry (U32, U64, U128).
ALLOWED_SIZES = (KVM_REG_SIZE_U32, KVM_REG_SIZE_U64, KVM_REG_SIZE_U128)
#: Hard limit on arm64.regs count (KVM_GET_REG_LIST returns a few hundred ids).
MAX_ONE_REGS = 4096


def reg_size(reg_id: int) -> int:
    """Value size in bytes from the id's KVM_REG_SIZE field (uapi kvm.h: KVM_REG_SIZE())."""
    return 1 << ((reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


def sysreg_id(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """ARM64_SYS_REG(op0, op1, crn, crm, op2) of arm64 kvm.h (a U64 register)."""
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG
            | sysreg_encoding(op0, op1, crn, crm, op2))


def sysreg_encoding(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """The 16-bit (op0, op1, CRn, CRm, op2) packing shared by KVM_REG_ARM64_SYSREG,
    KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS attributes (arm-vgic-v3.rst) and HVF's
    hv_sys_reg_t / hv_gic_icc_reg_t values."""
    for v, hi, what in ((op0, 3, "op0"), (op1, 7, "op1"), (crn, 15, "CRn"), (crm, 15, "CRm"),
                        (op2, 7, "op2")):
        if not 0 <= v <= hi:
            raise ValueError(f"{what} {v} out of range 0..{hi}")
    return (op0 << SYSREG_OP0_SHIFT) | (op1 << SYSREG_OP1_SHIFT) | (crn << SYSREG_CRN_SHIFT) \
        | (crm << SYSREG_CRM_SHIFT) | (op2 << SYSREG_OP2_SHIFT)


def sysreg_fields(enc: int) -> tuple[int, int, int, int, int]:
    """16-bit sysreg encoding -> (op0, op1, CRn, CRm, op2)."""
    return ((enc & SYSREG_OP0_MASK) >> SYSREG_OP0_SHIFT, (enc & SYSREG_OP1_MASK) >> SYSREG_OP1_SHIFT,
            (enc & SYSREG_CRN_MASK) >> SYSREG_CRN_SHIFT, (enc & SYSREG_CRM_MASK) >> SYSREG_CRM_SHIFT,
            (enc & SYSREG_OP2_MASK) >> SYSREG_OP2_SHIFT)


# --- core registers: offsets into struct kvm_regs --------------------------------
# arm64 kvm.h / asm/ptrace.h:
#   struct user_pt_regs { __u64 regs[31]; __u64 sp; __u64 pc; __u64 pstate; };      272 bytes
#   struct user_fpsimd_state { __uint128_t vregs[32]; __u32 fpsr; __u32 fpcr;
#                              __u32 __reserved[2]; };                               528 bytes
#   struct kvm_regs { struct user_pt_regs regs; __u64 sp_el1; __u64 elr_el1;
#                     __u64 spsr[KVM_NR_SPSR]; struct user_fpsimd_state fp_regs; };
# KVM_NR_SPSR = 5; fp_regs is 16-byte aligned so it starts at 336 (328 rounded up).
# KVM_REG_ARM_CORE_REG(name) = offsetof(struct kvm_regs, name) / sizeof(__u32).
KVM_NR_SPSR = 5
SPSR_NAMES = ("SPSR_EL1", "SPSR_ABT", "SPSR_UND", "SPSR_IRQ", "SPSR_FIQ")  # KVM_SPSR_EL1.. FIQ
_KVM_REGS_SP_EL1 = 272
_KVM_REGS_FP_REGS = 336

#: byte offset in struct kvm_regs -> (api.rst register name, kvm_regs member, size in bytes)
CORE_REGS: dict[int, tuple[str, str, int]] = {}
for _n in range(31):
    CORE_REGS[8 * _n] = (f"X{_n}", f"regs.regs[{_n}]", 8)
CORE_REGS[248] = ("SP", "regs.sp", 8)
CORE_REGS[256] = ("PC", "regs.pc", 8)
CORE_REGS[264] = ("PSTATE", "regs.pstate", 8)
CORE_REGS[_KVM_REGS_SP_EL1] = ("SP_EL1", "sp_el1", 8)
CORE_REGS[280] = ("ELR_EL1", "elr_el1", 8)
for _n, _name in enumerate(SPSR_NAMES):
    CORE_REGS[288 + 8 * _n] = (_name, f"spsr[{_n}]", 8)
for _n in range(32):
    CORE_REGS[_KVM_REGS_FP_REGS + 16 * _n] = (f"V{_n}", f"fp_regs.vregs[{_n}]", 16)
CORE_REGS[_KVM_REGS_FP_REGS + 512] = ("FPSR", "fp_regs.fpsr", 4)
CORE_REGS[_KVM_REGS_FP_REGS + 516] = ("FPCR", "fp_regs.fpcr", 4)
SIZEOF_KVM_REGS = _KVM_REGS_FP_REGS + 528
_CORE_BY_NAME = {v[0]: off for off, v in CORE_REGS.items()}
_CORE_BY_NAME.update({v[1]: off for off, v in CORE_REGS.items()})
_SIZE_FIELD = {4: KVM_REG_SIZE_U32, 8: KVM_REG_SIZE_U64, 16: KVM_REG_SIZE_U128}


def core_reg_id(name: str) -> int:
    """ONE_REG id of a core register by api.rst name ("X0", "PC", "V3", "FPSR") or
    kvm_regs member ("regs.pc", "fp_regs.vregs[3]"), with the size api.rst gives it."""
    off = _CORE_BY_NAME.get(name.upper() if name.upper() in _CORE_BY_NAME else name)
    if off is None:
        raise KeyError(f"no core register {name!r}")
    size = CORE_REGS[off][2]
    return KVM_REG_ARM64 | _SIZE_FIELD[size] | KVM_REG_ARM_CORE | (off // 4)


REG_PC = core_reg_id("PC")          # 0x6030000000100040
REG_PSTATE = core_reg_id("PSTATE")  # 0x6030000000100042

# --- system registers: Arm ARM encodings ----------------------------------------
#: (op0, op1, CRn, CRm, op2) -> architectural name.  Arm ARM (DDI 0487) "System
#: register index by encoding"; the same packing is hv_sys_reg_t (HVF) and the
#: ICC attribute of KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS.
SYSREG_NAMES: dict[tuple[int, int, int, int, int], str] = {
    # identification (op0=3, op1=0, CRn=0)
    (3, 0, 0, 0, 0): "MIDR_EL1", (3, 0, 0, 0, 5): "MPIDR_EL1", (3, 0, 0, 0, 6): "REVIDR_EL1",
    (3, 0, 0, 1, 0): "ID_PFR0_EL1", (3, 0, 0, 1, 1): "ID_PFR1_EL1", (3, 0, 0, 1, 2): "ID_DFR0_EL1",
    (3, 0, 0, 1, 3): "ID_AFR0_EL1", (3, 0, 0, 1, 4): "ID_MMFR0_EL1", (3, 0, 0, 1, 5): "ID_MMFR1_EL1",
    (3, 0, 0, 1, 6): "ID_MMFR2_EL1", (3, 0, 0, 1, 7): "ID_MMFR3_EL1",
    (3, 0, 0, 2, 0): "ID_ISAR0_EL1", (3, 0, 0, 2, 1): "ID_ISAR1_EL1", (3, 0, 0, 2, 2): "ID_ISAR2_EL1",
    (3, 0, 0, 2, 3): "ID_ISAR3_EL1", (3, 0, 0, 2, 4): "ID_ISAR4_EL1", (3, 0, 0, 2, 5): "ID_ISAR5_EL1",
    (3, 0, 0, 2, 6): "ID_MMFR4_EL1", (3, 0, 0, 2, 7): "ID_ISAR6_EL1",
    (3, 0, 0, 3, 0): "MVFR0_EL1", (3, 0, 0, 3, 1): "MVFR1_EL1", (3, 0, 0, 3, 2): "MVFR2_EL1",
    (3, 0, 0, 3, 4): "ID_PFR2_EL1", (3, 0, 0, 3, 5): "ID_DFR1_EL1", (3, 0, 0, 3, 6): "ID_MMFR5_EL1",
    (3, 0, 0, 4, 0): "ID_AA64PFR0_EL1", (3, 0, 0, 4, 1): "ID_AA64PFR1_EL1",
    (3, 0, 0, 4, 4): "ID_AA64ZFR0_EL1", (3, 0, 0, 4, 5): "ID_AA64SMFR0_EL1",
    (3, 0, 0, 5, 0): "ID_AA64DFR0_EL1", (3, 0, 0, 5, 1): "ID_AA64DFR1_EL1",
    (3, 0, 0, 5, 4): "ID_AA64AFR0_EL1", (3, 0, 0, 5, 5): "ID_AA64AFR1_EL1",
    (3, 0, 0, 6, 0): "ID_AA64ISAR0_EL1", (3, 0, 0, 6, 1): "ID_AA64ISAR1_EL1",
    (3, 0, 0, 6, 2): "ID_AA64ISAR2_EL1",
    (3, 0, 0, 7, 0): "ID_AA64MMFR0_EL1", (3, 0, 0, 7, 1): "ID_AA64MMFR1_EL1",
    (3, 0, 0, 7, 2): "ID_AA64MMFR2_EL1", (3, 0, 0, 7, 3): "ID_AA64MMFR3_EL1",
    (3, 1, 0, 0, 0): "CCSIDR_EL1", (3, 1, 0, 0, 1): "CLIDR_EL1", (3, 2, 0, 0, 0): "CSSELR_EL1",
    (3, 3, 0, 0, 1): "CTR_EL0", (3, 3, 0, 0, 7): "DCZID_EL0",
    # system control, translation, exception state
    (3, 0, 1, 0, 0): "SCTLR_EL1", (3, 0, 1, 0, 1): "ACTLR_EL1", (3, 0, 1, 0, 2): "CPACR_EL1",
    (3, 0, 1, 0, 5): "RGSR_EL1", (3, 0, 1, 0, 6): "GCR_EL1", (3, 0, 1, 2, 0): "ZCR_EL1",
    (3, 0, 2, 0, 0): "TTBR0_EL1", (3, 0, 2, 0, 1): "TTBR1_EL1", (3, 0, 2, 0, 2): "TCR_EL1",
    (3, 0, 2, 1, 0): "APIAKEYLO_EL1", (3, 0, 2, 1, 1): "APIAKEYHI_EL1",
    (3, 0, 2, 1, 2): "APIBKEYLO_EL1", (3, 0, 2, 1, 3): "APIBKEYHI_EL1",
    (3, 0, 2, 2, 0): "APDAKEYLO_EL1", (3, 0, 2, 2, 1): "APDAKEYHI_EL1",
    (3, 0, 2, 2, 2): "APDBKEYLO_EL1", (3, 0, 2, 2, 3): "APDBKEYHI_EL1",
    (3, 0, 2, 3, 0): "APGAKEYLO_EL1", (3, 0, 2, 3, 1): "APGAKEYHI_EL1",
    (3, 0, 4, 0, 0): "SPSR_EL1", (3, 0, 4, 0, 1): "ELR_EL1", (3, 0, 4, 1, 0): "SP_EL0",
    (3, 0, 5, 1, 0): "AFSR0_EL1", (3, 0, 5, 1, 1): "AFSR1_EL1", (3, 0, 5, 2, 0): "ESR_EL1",
    (3, 0, 5, 6, 0): "TFSR_EL1", (3, 0, 5, 6, 1): "TFSRE0_EL1",
    (3, 0, 6, 0, 0): "FAR_EL1", (3, 0, 7, 4, 0): "PAR_EL1",
    (3, 0, 10, 2, 0): "MAIR_EL1", (3, 0, 10, 3, 0): "AMAIR_EL1",
    (3, 0, 12, 0, 0): "VBAR_EL1", (3, 0, 12, 1, 1): "DISR_EL1",
    (3, 0, 13, 0, 1): "CONTEXTIDR_EL1", (3, 0, 13, 0, 4): "TPIDR_EL1",
    (3, 0, 14, 1, 0): "CNTKCTL_EL1",
    (3, 3, 13, 0, 2): "TPIDR_EL0", (3, 3, 13, 0, 3): "TPIDRRO_EL0",
    (3, 4, 4, 1, 0): "SP_EL1",
    # AArch32 state kept in EL2 registers (KVM saves them for 32-bit EL0)
    (3, 4, 3, 0, 0): "DACR32_EL2", (3, 4, 5, 0, 1): "IFSR32_EL2", (3, 4, 5, 3, 0): "FPEXC32_EL2",
    # generic timer (architectural encodings; see KVM_TIMER_NAMES for KVM's ids)
    (3, 3, 14, 0, 0): "CNTFRQ_EL0", (3, 3, 14, 0, 1): "CNTPCT_EL0", (3, 3, 14, 0, 2): "CNTVCT_EL0",
    (3, 3, 14, 2, 0): "CNTP_TVAL_EL0", (3, 3, 14, 2, 1): "CNTP_CTL_EL0",
    (3, 3, 14, 2, 2): "CNTP_CVAL_EL0", (3, 3, 14, 3, 0): "CNTV_TVAL_EL0",
    (3, 3, 14, 3, 1): "CNTV_CTL_EL0", (3, 3, 14, 3, 2): "CNTV_CVAL_EL0",
    # debug (op0=2)
    (2, 0, 0, 2, 0): "MDCCINT_EL1", (2, 0, 0, 2, 2): "MDSCR_EL1", (2, 0, 1, 0, 0): "MDRAR_EL1",
    (2, 0, 1, 0, 4): "OSLAR_EL1", (2, 0, 1, 1, 4): "OSLSR_EL1", (2, 0, 1, 3, 4): "OSDLR_EL1",
    (2, 0, 1, 4, 4): "DBGPRCR_EL1", (2, 0, 7, 8, 6): "DBGCLAIMSET_EL1",
    (2, 0, 7, 9, 6): "DBGCLAIMCLR_EL1", (2, 0, 7, 14, 6): "DBGAUTHSTATUS_EL1",
    (2, 3, 0, 1, 0): "MDCCSR_EL0", (2, 3, 0, 4, 0): "DBGDTR_EL0", (2, 3, 0, 5, 0): "DBGDTRRX_EL0",
    (2, 4, 0, 7, 0): "DBGVCR32_EL2",
    # performance monitors
    (3, 0, 9, 14, 1): "PMINTENSET_EL1", (3, 0, 9, 14, 2): "PMINTENCLR_EL1",
    (3, 3, 9, 12, 0): "PMCR_EL0", (3, 3, 9, 12, 1): "PMCNTENSET_EL0",
    (3, 3, 9, 12, 2): "PMCNTENCLR_EL0", (3, 3, 9, 12, 3): "PMOVSCLR_EL0",
    (3, 3, 9, 12, 4): "PMSWINC_EL0", (3, 3, 9, 12, 5): "PMSELR_EL0",
    (3, 3, 9, 12, 6): "PMCEID0_EL0", (3, 3, 9, 12, 7): "PMCEID1_EL0",
    (3, 3, 9, 13, 0): "PMCCNTR_EL0", (3, 3, 9, 13, 1): "PMXEVTYPER_EL0",
    (3, 3, 9, 13, 2): "PMXEVCNTR_EL0", (3, 3, 9, 14, 0): "PMUSERENR_EL0",
    (3, 3, 9, 14, 3): "PMOVSSET_EL0", (3, 3, 14, 15, 7): "PMCCFILTR_EL0",
    # GIC CPU interface (GICv3 spec 12.11 "The GIC CPU interface register descriptions")
    (3, 0, 4, 6, 0): "ICC_PMR_EL1",
    (3, 0, 12, 8, 0): "ICC_IAR0_EL1", (3, 0, 12, 8, 1): "ICC_EOIR0_EL1",
    (3, 0, 12, 8, 2): "ICC_HPPIR0_EL1", (3, 0, 12, 8, 3): "ICC_BPR0_EL1",
    (3, 0, 12, 11, 1): "ICC_DIR_EL1", (3, 0, 12, 11, 3): "ICC_RPR_EL1",
    (3, 0, 12, 11, 5): "ICC_SGI1R_EL1", (3, 0, 12, 11, 6): "ICC_ASGI1R_EL1",
    (3, 0, 12, 11, 7): "ICC_SGI0R_EL1",
    (3, 0, 12, 12, 0): "ICC_IAR1_EL1", (3, 0, 12, 12, 1): "ICC_EOIR1_EL1",
    (3, 0, 12, 12, 2): "ICC_HPPIR1_EL1", (3, 0, 12, 12, 3): "ICC_BPR1_EL1",
    (3, 0, 12, 12, 4): "ICC_CTLR_EL1", (3, 0, 12, 12, 5): "ICC_SRE_EL1",
    (3, 0, 12, 12, 6): "ICC_IGRPEN0_EL1", (3, 0, 12, 12, 7): "ICC_IGRPEN1_EL1",
    (3, 4, 12, 9, 5): "ICC_SRE_EL2",
}
for _n in range(4):
    SYSREG_NAMES[(3, 0, 12, 8, 4 + _n)] = f"ICC_AP0R{_n}_EL1"
    SYSREG_NAMES[(3, 0, 12, 9, _n)] = f"ICC_AP1R{_n}_EL1"
for _n in range(16):
    SYSREG_NAMES[(2, 0, 0, _n, 4)] = f"DBGBVR{_n}_EL1"
    SYSREG_NAMES[(2, 0, 0, _n, 5)] = f"DBGBCR{_n}_EL1"
    SYSREG_NAMES[(2, 0, 0, _n, 6)] = f"DBGWVR{_n}_EL1"
    SYSREG_NAMES[(2, 0, 0, _n, 7)] = f"DBGWCR{_n}_EL1"
for _n in range(31):
    SYSREG_NAMES[(3, 3, 14, 8 + (_n >> 3), _n & 7)] = f"PMEVCNTR{_n}_EL0"
    SYSREG_NAMES[(3, 3, 14, 12 + (_n >> 3), _n & 7)] = f"PMEVTYPER{_n}_EL0"
SYSREG_BY_NAME = {v: k for k, v in SYSREG_NAMES.items()}

#: KVM's timer ids (arm64 kvm.h).  WARNING from the header: KVM_REG_ARM_TIMER_CVAL
#: and KVM_REG_ARM_TIMER_CNT carry each other's architectural encoding (CNTVCT_EL0
#: and CNTV_CVAL_EL0 are swapped); the KVM meaning is what counts for ONE_REG.
KVM_TIMER_NAMES: dict[tuple[int, int, int, int, int], str] = {
    (3, 3, 14, 3, 1): "KVM_REG_ARM_TIMER_CTL",    # CNTV_CTL_EL0
    (3, 3, 14, 0, 2): "KVM_REG_ARM_TIMER_CVAL",   # encoding of CNTVCT_EL0, holds CNTV_CVAL
    (3, 3, 14, 3, 2): "KVM_REG_ARM_TIMER_CNT",    # encoding of CNTV_CVAL_EL0, holds CNTVCT
    (3, 3, 14, 2, 1): "KVM_REG_ARM_PTIMER_CTL",   # CNTP_CTL_EL0
    (3, 3, 14, 2, 2): "KVM_REG_ARM_PTIMER_CVAL",  # CNTP_CVAL_EL0
    (3, 3, 14, 0, 1): "KVM_REG_ARM_PTIMER_CNT",   # CNTPCT_EL0
}
KVM_REG_ARM_TIMER_CTL = sysreg_id(3, 3, 14, 3, 1)
KVM_REG_ARM_TIMER_CVAL = sysreg_id(3, 3, 14, 0, 2)
KVM_REG_ARM_TIMER_CNT = sysreg_id(3, 3, 14, 3, 2)
KVM_REG_ARM_PTIMER_CTL = sysreg_id(3, 3, 14, 2, 1)
KVM_REG_ARM_PTIMER_CVAL = sysreg_id(3, 3, 14, 2, 2)
KVM_REG_ARM_PTIMER_CNT = sysreg_id(3, 3, 14, 0, 1)
REG_MPIDR_EL1 = sysreg_id(3, 0, 0, 0, 5)


def sysreg_name(enc: int, *, kvm: bool = False) -> str:
    """Name of a 16-bit sysreg encoding; ``kvm=True`` applies KVM's timer-id names.
    Unknown encodings use the assembler's generic form ``S<op0>_<op1>_C<n>_C<m>_<op2>``."""
    f = sysreg_fields(enc & 0xFFFF)
    if kvm and f in KVM_TIMER_NAMES:
        return KVM_TIMER_NAMES[f]
    name = SYSREG_NAMES.get(f)
    if name is not None:
        return name
    op0, op1, crn, crm, op2 = f
    return f"S{op0}_{op1}_C{crn}_C{crm}_{op2}"


# --- firmware pseudo-registers (api.rst "arm64 firmware pseudo-registers") ---------
FW_REG_NAMES = {0: "KVM_REG_ARM_PSCI_VERSION", 1: "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1",
                2: "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2", 3: "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3"}
FW_FEAT_BMAP_NAMES = {0: "KVM_REG_ARM_STD_BMAP", 1: "KVM_REG_ARM_STD_HYP_BMAP",
                      2: "KVM_REG_ARM_VENDOR_HYP_BMAP", 3: "KVM_REG_ARM_VENDOR_HYP_BMAP_2"}


def fw_reg_id(r: int) -> int:
    """KVM_REG_ARM_FW_REG(r) of arm64 kvm.h."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW | (r & 0xFFFF)


KVM_REG_ARM_PSCI_VERSION = fw_reg_id(0)
KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1 = fw_reg_id(1)
KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2 = fw_reg_id(2)


def decode_reg_id(reg_id: int) -> dict:
    """Describe a KVM ONE_REG id (JSON-ready).

    Keys: ``name``; ``class`` (core/demux/sysreg/fw/sve/fw_feat_bmap/unknown);
    ``size`` in bytes from KVM_REG_SIZE; ``arch_ok`` (KVM_REG_ARM64); class
    extras: core -> ``field`` (kvm_regs member), ``expected_size``, ``valid``;
    sysreg -> ``op`` [op0, op1, CRn, CRm, op2]; fw -> ``index``.
    """
    reg_id &= 0xFFFFFFFFFFFFFFFF
    size = reg_size(reg_id)
    coproc = (reg_id & KVM_REG_ARM_COPROC_MASK) >> KVM_REG_ARM_COPROC_SHIFT
    out: dict[str, Any] = {"id": f"0x{reg_id:016x}", "size": size,
                           "arch_ok": (reg_id & KVM_REG_ARCH_MASK) == KVM_REG_ARM64,
                           "class": COPROC_NAMES.get(coproc, "unknown")}
    low = reg_id & 0xFFFF
    # bits 31..28 and 51..32 are zero in every arm64 id (api.rst bit patterns)
    out["reserved_ok"] = (reg_id & 0x000FFFFFF0000000) == 0
    if coproc == 0x0010:
        off = (reg_id & 0xFFFF) * 4
        core = CORE_REGS.get(off)
        if core is None:     # not the start of a struct kvm_regs member (or past its end)
            out.update(name=f"CORE+0x{off:x}", field=None, expected_size=None, valid=False)
        else:
            out.update(name=core[0], field=core[1], expected_size=core[2], valid=True)
    elif coproc == 0x0013:
        out["op"] = list(sysreg_fields(low))
        out["name"] = sysreg_name(low, kvm=True)
        out["expected_size"] = 8
        out["valid"] = True
    elif coproc == 0x0011:
        if (low & KVM_REG_ARM_DEMUX_ID_MASK) == KVM_REG_ARM_DEMUX_ID_CCSIDR:
            out["name"] = f"CCSIDR[{low & KVM_REG_ARM_DEMUX_VAL_MASK}]"
            out["valid"] = True
        else:
            out["name"] = f"DEMUX+0x{low:x}"
            out["valid"] = False
        out["expected_size"] = 4
    elif coproc == 0x0014:
        out["index"] = low
        out["name"] = FW_REG_NAMES.get(low, f"KVM_REG_ARM_FW_REG({low})")
        out["expected_size"] = 8
        out["valid"] = True
    elif coproc == 0x0016:
        out["index"] = low
        out["name"] = FW_FEAT_BMAP_NAMES.get(low, f"KVM_REG_ARM_FW_FEAT_BMAP_REG({low})")
        out["expected_size"] = 8
        out["valid"] = True
    elif coproc == 0x0015:
        # arm64 kvm.h: KVM_REG_ARM64_SVE_{ZREG,PREG,FFR}(n, i) = base | (n << 5) | i
        if low == KVM_REG_ARM64_SVE_VLS_INDEX:
            out.update(name="KVM_REG_ARM64_SVE_VLS", expected_size=64)
        elif low < KVM_REG_ARM64_SVE_PREG_BASE:
            out.update(name=f"Z{(low >> 5) & 0x1F}[{low & 0x1F}]", expected_size=256)
        elif low < KVM_REG_ARM64_SVE_FFR_BASE:
            out.update(name=f"P{(low >> 5) & 0xF}[{low & 0x1F}]", expected_size=32)
        else:
            out.update(name=f"FFR[{low & 0x1F}]", expected_size=32)
        out["valid"] = True
    else:
        out["name"] = f"ONE_REG_0x{reg_id:016x}"
        out["expected_size"] = None
        out["valid"] = False
    return out


def reg_name(reg_id: int) -> str:
    return decode_reg_id(reg_id)["name"]


# =============================================================================
# Declarations
# =============================================================================

KvmVcpuInit = c.Struct(
    "target" / c.Int32ul,                 # KVM_ARM_TARGET_* (KVM_ARM_PREFERRED_TARGET)
    "features" / c.Array(7, c.Int32ul),   # bitmap of KVM_ARM_VCPU_* feature numbers
)

# arm64 kvm.h
KVM_ARM_TARGET_NAMES = {0: "AEM_V8", 1: "FOUNDATION_V8", 2: "CORTEX_A57", 3: "XGENE_POTENZA",
                        4: "CORTEX_A53", 5: "GENERIC_V8"}
KVM_ARM_VCPU_FEATURES = {0: "POWER_OFF", 1: "EL1_32BIT", 2: "PSCI_0_2", 3: "PMU_V3", 4: "SVE",
                         5: "PTRAUTH_ADDRESS", 6: "PTRAUTH_GENERIC", 7: "HAS_EL2",
                         8: "HAS_EL2_E2H0"}
KVM_ARM_VCPU_SVE = 4

KvmMpState = c.Struct(
    "mp_state" / c.Int32ul,               # struct kvm_mp_state.mp_state (KVM_MP_STATE_*)
    "reserved" / c.Int32ul,               # snapfmt padding to 8 bytes; must be 0
)
# uapi kvm.h; api.rst 4.38 KVM_GET_MP_STATE: arm64 uses RUNNABLE, STOPPED, SUSPENDED.
KVM_MP_STATE_NAMES = {0: "RUNNABLE", 1: "UNINITIALIZED", 2: "INIT_RECEIVED", 3: "HALTED",
                      4: "SIPI_RECEIVED", 5: "STOPPED", 6: "CHECK_STOP", 7: "OPERATING",
                      8: "LOAD", 9: "AP_RESET_HOLD", 10: "SUSPENDED"}
KVM_MP_STATES_ARM64 = (0, 5, 10)

OneReg = c.Struct(
    "id" / c.Int64ul,                     # KVM ONE_REG id (api.rst 4.68)
    "value_lo" / c.Int64ul,               # value bytes 0..7 (little-endian)
    "value_hi" / c.Int64ul,               # value bytes 8..15: zero unless KVM_REG_SIZE_U128
)
OneRegsHeader = c.Struct(
    "count" / c.Int32ul,                  # number of records (<= MAX_ONE_REGS)
    "reserved" / c.Int32ul,               # must be 0
)
OneRegs = c.Struct(
    *OneRegsHeader.subcons,
    "regs" / c.Array(c.this.count, OneReg),
)
ONE_REG_DTYPE = dtype_of(OneReg)

# --- Hypervisor.framework ---------------------------------------------------------
# HVF hv_vcpu_types.h: enum hv_reg_t.
HV_REG_NAMES = {**{n: f"HV_REG_X{n}" for n in range(31)}, 31: "HV_REG_PC", 32: "HV_REG_FPCR",
                33: "HV_REG_FPSR", 34: "HV_REG_CPSR"}
HV_REG_PC = 31
HV_REG_CPSR = 34
# HVF: enum hv_simd_fp_reg_t: HV_SIMD_FP_REG_Q0..Q31 = 0..31 (hv_simd_fp_uchar16_t values).
HV_SIMD_FP_REG_NAMES = {n: f"HV_SIMD_FP_REG_Q{n}" for n in range(32)}
#: hv_sys_reg_t values are the 16-bit sysreg encodings (HV_SYS_REG_SCTLR_EL1 = 0xc080 ...);
#: names come from SYSREG_NAMES with an "HV_SYS_REG_" prefix.
HV_SYS_REG_MPIDR_EL1 = sysreg_encoding(3, 0, 0, 0, 5)   # 0xc005
HVF_F_VTIMER_MASKED = 1 << 0     # hv_vcpu_get_vtimer_mask() returned true
HVF_F_IRQ_PENDING = 1 << 1       # hv_vcpu_get_pending_interrupt(HV_INTERRUPT_TYPE_IRQ)
HVF_F_FIQ_PENDING = 1 << 2       # hv_vcpu_get_pending_interrupt(HV_INTERRUPT_TYPE_FIQ)
HVF_F_KNOWN = HVF_F_VTIMER_MASKED | HVF_F_IRQ_PENDING | HVF_F_FIQ_PENDING
HVF_FLAG_NAMES = {0: "VTIMER_MASKED", 1: "IRQ_PENDING", 2: "FIQ_PENDING"}
MAX_HVF_GPRS = 64
MAX_HVF_SYS_REGS = 4096
MAX_HVF_SIMD = 64

HvfReg = c.Struct(
    "id" / c.Int32ul,                     # hv_reg_t
    "reserved" / c.Int32ul,               # must be 0
    "value" / c.Int64ul,                  # hv_vcpu_get_reg
)
HvfSysReg = c.Struct(
    "id" / c.Int16ul,                     # hv_sys_reg_t (op0..op2 encoding)
    "reserved0" / c.Int16ul,              # must be 0
    "reserved1" / c.Int32ul,              # must be 0
    "value" / c.Int64ul,                  # hv_vcpu_get_sys_reg
)
HvfSimdReg = c.Struct(
    "id" / c.Int32ul,                     # hv_simd_fp_reg_t
    "reserved" / c.Int32ul,               # must be 0
    "value_lo" / c.Int64ul,               # hv_simd_fp_uchar16_t bytes 0..7
    "value_hi" / c.Int64ul,               # bytes 8..15
)
HvfVcpuHeader = c.Struct(
    "gpr_count" / c.Int32ul,              # records in gprs[]
    "sys_count" / c.Int32ul,              # records in sys_regs[]
    "simd_count" / c.Int32ul,             # records in simd[]
    "flags" / c.Int32ul,                  # HVF_F_*
    "vtimer_offset" / c.Int64ul,          # hv_vcpu_get_vtimer_offset
)
HvfVcpu = c.Struct(
    *HvfVcpuHeader.subcons,
    "gprs" / c.Array(c.this.gpr_count, HvfReg),
    "sys_regs" / c.Array(c.this.sys_count, HvfSysReg),
    "simd" / c.Array(c.this.simd_count, HvfSimdReg),
)

# --- GIC: KVM device attribute groups ---------------------------------------------
# arm64 kvm.h: KVM_DEV_ARM_VGIC_GRP_*; arm-vgic-v3.rst / arm-vgic.rst "Groups".
KVM_DEV_ARM_VGIC_GRP_ADDR = 0
KVM_DEV_ARM_VGIC_GRP_DIST_REGS = 1
KVM_DEV_ARM_VGIC_GRP_CPU_REGS = 2        # GICv2 only
KVM_DEV_ARM_VGIC_GRP_NR_IRQS = 3
KVM_DEV_ARM_VGIC_GRP_CTRL = 4            # actions (INIT, SAVE_PENDING_TABLES), not state
KVM_DEV_ARM_VGIC_GRP_REDIST_REGS = 5
KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS = 6
KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO = 7
KVM_DEV_ARM_VGIC_GRP_ITS_REGS = 8
VGIC_GROUP_NAMES = {0: "ADDR", 1: "DIST_REGS", 2: "CPU_REGS", 3: "NR_IRQS", 4: "CTRL",
                    5: "REDIST_REGS", 6: "CPU_SYSREGS", 7: "LEVEL_INFO", 8: "ITS_REGS",
                    9: "MAINT_IRQ"}
#: Groups an arm64.gicv3 record may carry, with the width of the value KVM transfers.
#: arm-vgic-v3.rst: DIST/REDIST regs and LEVEL_INFO are 32-bit, ADDR/CPU_SYSREGS 64-bit,
#: NR_IRQS 32-bit; arm-vgic-its.rst: ITS_REGS 64-bit.
GICV3_GROUP_WIDTH = {0: 8, 1: 4, 3: 4, 5: 4, 6: 8, 7: 4, 8: 8}
#: Groups an arm64.gicv2 record may carry (arm-vgic.rst); all 32-bit.  The 64-bit
#: KVM_DEV_ARM_VGIC_GRP_ADDR values live in the arm64.gicv2 header instead.
GICV2_GROUPS = (1, 2, 3)
# KVM_VGIC_V3_ADDR_TYPE_* (arm64 kvm.h), alignment from arm-vgic-v3.rst / arm-vgic-its.rst.
VGIC_V3_ADDR_TYPES = {2: "DIST", 3: "REDIST", 4: "ITS", 5: "REDIST_REGION"}
# LEVEL_INFO attr (arm64 kvm.h): info in bits 31..10, vINTID in 9..0.
KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT = 10
KVM_DEV_ARM_VGIC_LINE_LEVEL_INTID_MASK = 0x3FF
VGIC_LEVEL_INFO_LINE_LEVEL = 0
MAX_GICV3_ATTRS = 1 << 17
MAX_GICV2_ATTRS = 1 << 14

GicAttr = c.Struct(
    "group" / c.Int32ul,    # KVM_DEV_ARM_VGIC_GRP_*
    "mpidr" / c.Int32ul,    # kvm_device_attr.attr[63:32]: Aff3.Aff2.Aff1.Aff0 of the vCPU
                            # (redistributor, ICC, LEVEL_INFO); 0 for dist/ADDR/NR_IRQS/ITS
    "attr" / c.Int32ul,     # attr[31:0]: register offset (DIST/REDIST/ITS), ICC encoding
                            # (CPU_SYSREGS), info<<10|vINTID (LEVEL_INFO), addr type (ADDR)
    "reserved" / c.Int32ul,  # must be 0
    "value" / c.Int64ul,    # the __u32/__u64 KVM_{GET,SET}_DEVICE_ATTR transfers
)
GicAttrsHeader = c.Struct(
    "count" / c.Int32ul,    # records (<= MAX_GICV3_ATTRS)
    "reserved" / c.Int32ul,  # must be 0
)
GicV3 = c.Struct(*GicAttrsHeader.subcons, "regs" / c.Array(c.this.count, GicAttr))
GIC_ATTR_DTYPE = dtype_of(GicAttr)

GicV2Attr = c.Struct(
    "group" / c.Int32ul,    # KVM_DEV_ARM_VGIC_GRP_DIST_REGS / CPU_REGS / NR_IRQS
    "cpuid" / c.Int32ul,    # kvm_device_attr.attr[39:32] (vCPU index; banked registers)
    "offset" / c.Int32ul,   # attr[31:0]: offset in the GICD / GICC frame
    "value" / c.Int32ul,    # all GICv2 registers are 32-bit (arm-vgic.rst)
)
GicV2Header = c.Struct(
    "count" / c.Int32ul,
    "reserved" / c.Int32ul,
    "dist_base" / c.Int64ul,   # KVM_VGIC_V2_ADDR_TYPE_DIST (GRP_ADDR attr 0), 4 KiB aligned
    "cpu_base" / c.Int64ul,    # KVM_VGIC_V2_ADDR_TYPE_CPU (GRP_ADDR attr 1), 4 KiB aligned
)
GicV2 = c.Struct(*GicV2Header.subcons, "regs" / c.Array(c.this.count, GicV2Attr))
GICV2_ATTR_DTYPE = dtype_of(GicV2Attr)

# HVF <Hypervisor/hv_gic_types.h>: hv_gic_icc_reg_t values are sysreg encodings.
GicIccReg = c.Struct(
    "vcpu" / c.Int32ul,     # vCPU index
    "reg" / c.Int16ul,      # hv_gic_icc_reg_t (HV_GIC_ICC_REG_PMR_EL1 = 0xc230 ...)
    "reserved" / c.Int16ul,  # must be 0
    "value" / c.Int64ul,    # hv_gic_get_icc_reg
)
GicBlobHeader = c.Struct(
    "blob_len" / c.Int32ul,  # hv_gic_state_get_size
    "icc_count" / c.Int32ul,
)
GicBlob = c.Struct(
    *GicBlobHeader.subcons,
    "icc" / c.Array(c.this.icc_count, GicIccReg),
    "blob" / HexBytes(c.this.blob_len),   # hv_gic_state_get_data, opaque
)
MAX_GIC_ICC = 1 << 14
MAX_GIC_BLOB = 64 << 20


# =============================================================================
# GIC register maps
# =============================================================================

class GicReg:
    """One register (or an array of registers) in a GIC MMIO frame."""
    __slots__ = ("name", "base", "count", "width", "bits_per_irq", "indexed")

    def __init__(self, name, base, count=1, width=4, bits_per_irq=0, indexed=None):
        self.name = name
        self.base = base
        self.count = count
        self.width = width                # bytes per register instance
        self.bits_per_irq = bits_per_irq  # >0: per-IRQ register (n-th covers IRQs n*irqs_per..)
        self.indexed = count > 1 if indexed is None else indexed

    @property
    def irqs_per_reg(self) -> int:
        return self.width * 8 // self.bits_per_irq if self.bits_per_irq else 0

    @property
    def end(self) -> int:
        return self.base + self.count * self.width


def _id_regs(prefix: str, base: int) -> list[GicReg]:
    # GICv3 spec 12.1.2 "Identification registers": PIDR4-7, PIDR0-3, CIDR0-3 at 0xFFD0..0xFFFC
    names = [f"{prefix}_PIDR{n}" for n in (4, 5, 6, 7, 0, 1, 2, 3)] + \
            [f"{prefix}_CIDR{n}" for n in range(4)]
    return [GicReg(n, base + 4 * i) for i, n in enumerate(names)]


# GICv3 spec 12.8 "The GIC Distributor register map" (64 KiB frame), restricted to what
# KVM's vgic-mmio-v3 exposes to userspace.  GICD_IROUTER<n> are 64-bit at 0x6000 + 8n;
# n < 32 are reserved, so SPI routing lives at 0x6100..0x7FDF (IROUTER32..IROUTER1019).
GICD_REGS = [
    GicReg("GICD_CTLR", 0x0000), GicReg("GICD_TYPER", 0x0004), GicReg("GICD_IIDR", 0x0008),
    GicReg("GICD_TYPER2", 0x000C), GicReg("GICD_STATUSR", 0x0010),
    GicReg("GICD_SETSPI_NSR", 0x0040), GicReg("GICD_CLRSPI_NSR", 0x0048),
    GicReg("GICD_SETSPI_SR", 0x0050), GicReg("GICD_CLRSPI_SR", 0x0058),
    GicReg("GICD_IGROUPR", 0x0080, 32, 4, 1), GicReg("GICD_ISENABLER", 0x0100, 32, 4, 1),
    GicReg("GICD_ICENABLER", 0x0180, 32, 4, 1), GicReg("GICD_ISPENDR", 0x0200, 32, 4, 1),
    GicReg("GICD_ICPENDR", 0x0280, 32, 4, 1), GicReg("GICD_ISACTIVER", 0x0300, 32, 4, 1),
    GicReg("GICD_ICACTIVER", 0x0380, 32, 4, 1), GicReg("GICD_IPRIORITYR", 0x0400, 255, 4, 8),
    GicReg("GICD_ITARGETSR", 0x0800, 255, 4, 8), GicReg("GICD_ICFGR", 0x0C00, 64, 4, 2),
    GicReg("GICD_IGRPMODR", 0x0D00, 32, 4, 1), GicReg("GICD_NSACR", 0x0E00, 64, 4, 2),
    GicReg("GICD_SGIR", 0x0F00), GicReg("GICD_CPENDSGIR", 0x0F10, 4, 4),
    GicReg("GICD_SPENDSGIR", 0x0F20, 4, 4),
    GicReg("GICD_IROUTER", 0x6000, 1020, 8, 64),
    *_id_regs("GICD", 0xFFD0),
]
GICD_FRAME_SIZE = 0x10000

# GICv3 spec 12.10 "The GIC Redistributor register map": RD_base frame at 0, SGI_base
# frame at 0x10000 (KVM's REDIST_REGS offset covers both, arm-vgic-v3.rst).
GICR_SGI_BASE = 0x10000
GICR_REGS = [
    GicReg("GICR_CTLR", 0x0000), GicReg("GICR_IIDR", 0x0004), GicReg("GICR_TYPER", 0x0008, 1, 8),
    GicReg("GICR_STATUSR", 0x0010), GicReg("GICR_WAKER", 0x0014),
    GicReg("GICR_SETLPIR", 0x0040, 1, 8), GicReg("GICR_CLRLPIR", 0x0048, 1, 8),
    GicReg("GICR_PROPBASER", 0x0070, 1, 8), GicReg("GICR_PENDBASER", 0x0078, 1, 8),
    GicReg("GICR_INVLPIR", 0x00A0, 1, 8), GicReg("GICR_INVALLR", 0x00B0, 1, 8),
    GicReg("GICR_SYNCR", 0x00C0),
    *_id_regs("GICR", 0xFFD0),
    GicReg("GICR_IGROUPR0", GICR_SGI_BASE + 0x0080, 1, 4, 1),
    GicReg("GICR_ISENABLER0", GICR_SGI_BASE + 0x0100, 1, 4, 1),
    GicReg("GICR_ICENABLER0", GICR_SGI_BASE + 0x0180, 1, 4, 1),
    GicReg("GICR_ISPENDR0", GICR_SGI_BASE + 0x0200, 1, 4, 1),
    GicReg("GICR_ICPENDR0", GICR_SGI_BASE + 0x0280, 1, 4, 1),
    GicReg("GICR_ISACTIVER0", GICR_SGI_BASE + 0x0300, 1, 4, 1),
    GicReg("GICR_ICACTIVER0", GICR_SGI_BASE + 0x0380, 1, 4, 1),
    GicReg("GICR_IPRIORITYR", GICR_SGI_BASE + 0x0400, 8, 4, 8),
    GicReg("GICR_ICFGR", GICR_SGI_BASE + 0x0C00, 2, 4, 2),
    GicReg("GICR_IGRPMODR0", GICR_SGI_BASE + 0x0D00, 1, 4, 1),
    GicReg("GICR_NSACR", GICR_SGI_BASE + 0x0E00, 1, 4, 2, indexed=False),
]
GICR_FRAMES_SIZE = 0x20000

# GICv3 spec 12.19 "The ITS register map"; arm-vgic-its.rst KVM_DEV_ARM_VGIC_GRP_ITS_REGS.
# KVM accesses 64-bit ITS registers whole (offset 8-aligned), 32-bit ones 4-aligned.
GITS_REGS = [
    GicReg("GITS_CTLR", 0x0000), GicReg("GITS_IIDR", 0x0004), GicReg("GITS_TYPER", 0x0008, 1, 8),
    GicReg("GITS_CBASER", 0x0080, 1, 8), GicReg("GITS_CWRITER", 0x0088, 1, 8),
    GicReg("GITS_CREADR", 0x0090, 1, 8), GicReg("GITS_BASER", 0x0100, 8, 8),
    *_id_regs("GITS", 0xFFD0),
]

# GICv2 spec 4.1.2 "Distributor register map" (4 KiB) and 4.1.3 "CPU interface register
# map", restricted to what KVM's vgic-mmio-v2 exposes (arm-vgic.rst).
GICV2_DIST_REGS = [
    GicReg("GICD_CTLR", 0x000), GicReg("GICD_TYPER", 0x004), GicReg("GICD_IIDR", 0x008),
    GicReg("GICD_IGROUPR", 0x080, 32, 4, 1), GicReg("GICD_ISENABLER", 0x100, 32, 4, 1),
    GicReg("GICD_ICENABLER", 0x180, 32, 4, 1), GicReg("GICD_ISPENDR", 0x200, 32, 4, 1),
    GicReg("GICD_ICPENDR", 0x280, 32, 4, 1), GicReg("GICD_ISACTIVER", 0x300, 32, 4, 1),
    GicReg("GICD_ICACTIVER", 0x380, 32, 4, 1), GicReg("GICD_IPRIORITYR", 0x400, 255, 4, 8),
    GicReg("GICD_ITARGETSR", 0x800, 255, 4, 8), GicReg("GICD_ICFGR", 0xC00, 64, 4, 2),
    GicReg("GICD_SGIR", 0xF00), GicReg("GICD_CPENDSGIR", 0xF10, 4, 4),
    GicReg("GICD_SPENDSGIR", 0xF20, 4, 4),
]
GICV2_CPU_REGS = [
    GicReg("GICC_CTLR", 0x00), GicReg("GICC_PMR", 0x04), GicReg("GICC_BPR", 0x08),
    GicReg("GICC_ABPR", 0x1C), GicReg("GICC_APR", 0xD0, 4, 4), GicReg("GICC_IIDR", 0xFC),
]

#: ICC registers KVM saves/restores through KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS
#: (arm-vgic-v3.rst; the kernel's vgic-sys-reg-v3.c descriptor table).
ICC_KVM_SYSREGS = {SYSREG_BY_NAME[n] for n in (
    "ICC_PMR_EL1", "ICC_BPR0_EL1", "ICC_AP0R0_EL1", "ICC_AP0R1_EL1", "ICC_AP0R2_EL1",
    "ICC_AP0R3_EL1", "ICC_AP1R0_EL1", "ICC_AP1R1_EL1", "ICC_AP1R2_EL1", "ICC_AP1R3_EL1",
    "ICC_BPR1_EL1", "ICC_CTLR_EL1", "ICC_SRE_EL1", "ICC_IGRPEN0_EL1", "ICC_IGRPEN1_EL1")}
ICC_KVM_ENCODINGS = {sysreg_encoding(*f) for f in ICC_KVM_SYSREGS}
#: HVF hv_gic_icc_reg_t (hv_gic_types.h): the ICC registers hv_gic_{get,set}_icc_reg take.
HV_GIC_ICC_ENCODINGS = ICC_KVM_ENCODINGS | {sysreg_encoding(3, 0, 12, 11, 3),   # RPR_EL1
                                            sysreg_encoding(3, 4, 12, 9, 5)}    # SRE_EL2


def gic_lookup(regs: list[GicReg], offset: int) -> tuple[GicReg, int, int] | None:
    """(register, instance index, byte offset within the instance) or None."""
    for r in regs:
        if r.base <= offset < r.end:
            rel = offset - r.base
            return r, rel // r.width, rel % r.width
    return None


def gic_reg_name(regs: list[GicReg], offset: int) -> str | None:
    hit = gic_lookup(regs, offset)
    if hit is None:
        return None
    r, n, within = hit
    name = f"{r.name}{n}" if r.indexed else r.name
    if r.width == 8 and within == 4:
        name += "[63:32]"
    elif r.width == 8 and within == 0 and regs is not GITS_REGS:
        name += "[31:0]"
    return name


def gic_irq_range(regs: list[GicReg], offset: int) -> tuple[int, int] | None:
    """First and last INTID a per-IRQ register at ``offset`` covers, else None."""
    hit = gic_lookup(regs, offset)
    if hit is None or not hit[0].bits_per_irq:
        return None
    r, n, _ = hit
    first = n * r.irqs_per_reg
    return first, first + r.irqs_per_reg - 1


def vgic_mpidr(mpidr_el1: int) -> int:
    """MPIDR_EL1 -> the 32-bit Aff3.Aff2.Aff1.Aff0 of a KVM vgic attr (arm-vgic-v3.rst;
    inverse of the kernel's VGIC_TO_MPIDR)."""
    return (((mpidr_el1 >> 32) & 0xFF) << 24) | (mpidr_el1 & 0xFFFFFF)


def gic_attr_name(rec: dict) -> str:
    g, attr = rec["group"], rec["attr"]
    if g == KVM_DEV_ARM_VGIC_GRP_DIST_REGS:
        return gic_reg_name(GICD_REGS, attr) or f"GICD+0x{attr:x}"
    if g == KVM_DEV_ARM_VGIC_GRP_REDIST_REGS:
        return gic_reg_name(GICR_REGS, attr) or f"GICR+0x{attr:x}"
    if g == KVM_DEV_ARM_VGIC_GRP_ITS_REGS:
        return gic_reg_name(GITS_REGS, attr) or f"GITS+0x{attr:x}"
    if g == KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS:
        return sysreg_name(attr & 0xFFFF)
    if g == KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO:
        intid = attr & KVM_DEV_ARM_VGIC_LINE_LEVEL_INTID_MASK
        return f"LINE_LEVEL[{intid}..{intid + 31}]"
    if g == KVM_DEV_ARM_VGIC_GRP_ADDR:
        return f"KVM_VGIC_V3_ADDR_TYPE_{VGIC_V3_ADDR_TYPES.get(attr, attr)}"
    if g == KVM_DEV_ARM_VGIC_GRP_NR_IRQS:
        return "NR_IRQS"
    return f"{VGIC_GROUP_NAMES.get(g, g)}+0x{attr:x}"


# =============================================================================
# Decoding / encoding of the variable-length kinds
# =============================================================================

def _records(buf: bytes, dtype: np.dtype, count: int, offset: int) -> list[dict]:
    """JSON-ready list of integer records read with numpy (no construct per record)."""
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    cols = [arr[n].tolist() for n in dtype.names]
    return [dict(zip(dtype.names, row)) for row in zip(*cols)]


def _counted(buf: bytes, section: str, header: c.Struct,
             arrays: list[tuple[str, str, c.Struct, int]]) -> tuple[dict, list[int]]:
    """Parse ``header`` and check each (array field, count field, record, limit) against the
    length.  Returns (header fields, byte offset of each array)."""
    hsz = header.sizeof()
    if len(buf) < hsz:
        raise FormatError(f"{len(buf)} bytes, shorter than its {hsz}-byte header",
                          section=section, field="length", offset=0, code="bad-length")
    hdr = _clean(header.parse(buf[:hsz]))
    field_off = {}
    off = 0
    for sc in header.subcons:
        field_off[sc.name] = off
        off += sc.sizeof()
    offs = []
    off = hsz
    for field, count_field, rec, limit in arrays:
        n = hdr[count_field]
        if n > limit:
            raise LimitError(f"{count_field} {n} > limit {limit}", section=section,
                             field=count_field, offset=field_off[count_field], code="limit")
        offs.append(off)
        off += n * rec.sizeof()
    return hdr, offs + [off]


def _exact_length(buf: bytes, section: str, want: int) -> None:
    if want != len(buf):
        raise FormatError(f"counts need {want} bytes, section has {len(buf)}",
                          section=section, field="length", offset=min(want, len(buf)),
                          code="bad-length")


def _encode_counted(decl: c.Struct, section: str, arrays: list[tuple[str, str, int]],
                    decode: Callable[[bytes], dict]) -> Callable[[dict], bytes]:
    """encode_fn: fill in count fields, enforce limits, build, and re-check with ``decode``
    so that encode never emits bytes the decoder rejects."""
    def encode(fields: dict) -> bytes:
        if not isinstance(fields, dict):
            raise EncodeError("expected an object of fields", section=section)
        obj = dict(fields)
        for field, count_field, limit in arrays:
            items = obj.get(field)
            if not isinstance(items, list):
                raise EncodeError(f"{field} must be a list", section=section, field=field)
            if count_field in obj and obj[count_field] != len(items):
                raise EncodeError(f"{count_field} {obj[count_field]} != {len(items)} records",
                                  section=section, field=count_field)
            if len(items) > limit:
                raise EncodeError(f"{len(items)} records > limit {limit}", section=section,
                                  field=field)
            obj[count_field] = len(items)
        try:
            out = decl.build(obj)
        except (c.ConstructError, KeyError, TypeError, ValueError, OverflowError) as e:
            raise EncodeError(f"cannot encode: {' '.join(str(e).split())}",
                              section=section) from None
        try:
            decode(out)
        except FormatError as e:
            raise EncodeError(e.message, section=section, field=e.field) from None
        return out
    return encode


# --- arm64.regs -------------------------------------------------------------------

def check_regs(buf) -> int:
    """Structural check of an arm64.regs blob (count vs length, limit); returns count."""
    buf = bytes(buf)
    hdr, offs = _counted(buf, "arm64.regs", OneRegsHeader,
                         [("regs", "count", OneReg, MAX_ONE_REGS)])
    _exact_length(buf, "arm64.regs", offs[-1])
    return hdr["count"]


def regs_array(buf) -> np.ndarray:
    """The records of an arm64.regs blob as a numpy structured array (id, value_lo,
    value_hi), no copy.  Only the structure is checked."""
    n = check_regs(buf)
    return np.frombuffer(buf, dtype=ONE_REG_DTYPE, count=n, offset=OneRegsHeader.sizeof())


def _decode_regs(buf: bytes) -> dict:
    # Structure only (the same check_regs runs at load, so validate does not decode
    # again): an id whose KVM_REG_SIZE is not U32/U64/U128 is a finding
    # (arm64-reg-size-unsupported in arm64_checks), not a decode error.
    n = check_regs(buf)
    hsz = OneRegsHeader.sizeof()
    hdr = _clean(OneRegsHeader.parse(buf[:hsz]))
    hdr["regs"] = _records(buf, ONE_REG_DTYPE, n, hsz)
    return hdr


def reg_value(rec: dict) -> int:
    """The register value of a decoded record (value_lo | value_hi << 64)."""
    return rec["value_lo"] | (rec["value_hi"] << 64)


def build_regs(pairs) -> dict:
    """Fields for arm64.regs from (id, value) pairs; value may be up to 128 bits."""
    regs = []
    for rid, value in pairs:
        if not 0 <= value < (1 << 128):
            raise EncodeError(f"value of 0x{rid:x} does not fit 128 bits", section="arm64.regs")
        regs.append({"id": rid, "value_lo": value & 0xFFFFFFFFFFFFFFFF, "value_hi": value >> 64})
    return {"count": len(regs), "reserved": 0, "regs": regs}


def regs_dict(fields: dict) -> dict[int, int]:
    """{id: value} of decoded arm64.regs fields (the last record wins on duplicates)."""
    return {r["id"]: reg_value(r) for r in fields["regs"]}


def mpidr(fields: dict) -> int | None:
    """MPIDR_EL1 of a vCPU from decoded arm64.regs fields, or None when absent."""
    for r in fields["regs"]:
        if r["id"] == REG_MPIDR_EL1:
            return r["value_lo"]
    return None


def hvf_mpidr(fields: dict) -> int | None:
    """MPIDR_EL1 of a vCPU from decoded arm64.hvf_vcpu fields, or None when absent."""
    for r in fields["sys_regs"]:
        if r["id"] == HV_SYS_REG_MPIDR_EL1:
            return r["value"]
    return None


# PSTATE / SPSR (Arm ARM C5.2.18 "SPSR_EL1"; arm64 ptrace.h PSR_MODE_*)
PSR_MODES = {0x0: "EL0t", 0x4: "EL1t", 0x5: "EL1h", 0x8: "EL2t", 0x9: "EL2h"}
PSR_BITS = {31: "N", 30: "Z", 29: "C", 28: "V", 22: "PAN", 21: "SS", 20: "IL", 9: "D",
            8: "A", 7: "I", 6: "F", 4: "nRW(AArch32)"}


def pstate_info(v: int) -> dict:
    return {"mode": PSR_MODES.get(v & 0x1F, f"0x{v & 0x1F:x}"),
            "flags": [n for b, n in sorted(PSR_BITS.items(), reverse=True) if v >> b & 1]}


def _hex(v: int, size: int) -> str:
    return f"0x{v:0{size * 2}x}"


def _annotate_regs(f: dict) -> dict:
    out = []
    for r in f["regs"]:
        d = decode_reg_id(r["id"])
        v = reg_value(r)
        e = {"name": d["name"], "class": d["class"], "size": d["size"],
             "value": _hex(v, min(d["size"], VALUE_SLOT))}
        if "field" in d and d["field"]:
            e["field"] = d["field"]
        if "op" in d:
            e["op"] = d["op"]
        if d["name"] in ("PSTATE",) or d["name"].startswith("SPSR_"):
            e["decoded"] = pstate_info(v)
        if d["name"] == "MPIDR_EL1":
            e["decoded"] = {"aff0": v & 0xFF, "aff1": v >> 8 & 0xFF, "aff2": v >> 16 & 0xFF,
                            "aff3": v >> 32 & 0xFF, "vgic_mpidr": f"0x{vgic_mpidr(v):08x}"}
        out.append(e)
    return {"regs": out}


# --- arm64.hvf_vcpu ---------------------------------------------------------------

_HVF_ARRAYS = [("gprs", "gpr_count", HvfReg, MAX_HVF_GPRS),
               ("sys_regs", "sys_count", HvfSysReg, MAX_HVF_SYS_REGS),
               ("simd", "simd_count", HvfSimdReg, MAX_HVF_SIMD)]
_HVF_DTYPES = [dtype_of(rec) for _, _, rec, _ in _HVF_ARRAYS]
GIC_ICC_DTYPE = dtype_of(GicIccReg)


def _decode_hvf(buf: bytes) -> dict:
    buf = bytes(buf)
    hdr, offs = _counted(buf, "arm64.hvf_vcpu", HvfVcpuHeader, _HVF_ARRAYS)
    _exact_length(buf, "arm64.hvf_vcpu", offs[-1])
    for (field, count_field, _, _), dt, off in zip(_HVF_ARRAYS, _HVF_DTYPES, offs):
        hdr[field] = _records(buf, dt, hdr[count_field], off)
    return hdr


def hv_sys_reg_name(enc: int) -> str:
    return "HV_SYS_REG_" + sysreg_name(enc)


def _annotate_hvf(f: dict) -> dict:
    return {
        "flags": [n for b, n in HVF_FLAG_NAMES.items() if f["flags"] >> b & 1],
        "gprs": {HV_REG_NAMES.get(r["id"], f"hv_reg_t({r['id']})"): f"0x{r['value']:016x}"
                 for r in f["gprs"]},
        "sys_regs": {hv_sys_reg_name(r["id"]): f"0x{r['value']:016x}" for r in f["sys_regs"]},
        "simd": {HV_SIMD_FP_REG_NAMES.get(r["id"], f"hv_simd_fp_reg_t({r['id']})"):
                 _hex(reg_value(r), 16) for r in f["simd"]},
    }


# --- arm64.gicv3 / arm64.gicv2 ------------------------------------------------------

def check_gicv3(buf) -> int:
    buf = bytes(buf)
    hdr, offs = _counted(buf, "arm64.gicv3", GicAttrsHeader,
                         [("regs", "count", GicAttr, MAX_GICV3_ATTRS)])
    _exact_length(buf, "arm64.gicv3", offs[-1])
    return hdr["count"]


def _decode_gicv3(buf: bytes) -> dict:
    n = check_gicv3(buf)
    hsz = GicAttrsHeader.sizeof()
    hdr = _clean(GicAttrsHeader.parse(buf[:hsz]))
    hdr["regs"] = _records(buf, GIC_ATTR_DTYPE, n, hsz)
    return hdr


def gic_attrs_array(buf) -> np.ndarray:
    """The records of an arm64.gicv3 blob as a numpy structured array, no copy."""
    n = check_gicv3(buf)
    return np.frombuffer(buf, dtype=GIC_ATTR_DTYPE, count=n, offset=GicAttrsHeader.sizeof())


def gicd_typer_info(typer: int) -> dict:
    """GICv3 spec 12.9.38 GICD_TYPER fields."""
    n = typer & 0x1F
    return {"ITLinesNumber": n, "max_intid": min(32 * (n + 1), 1020) - 1,
            "CPUNumber": typer >> 5 & 7, "SecurityExtn": typer >> 10 & 1,
            "MBIS": typer >> 16 & 1, "LPIS": typer >> 17 & 1, "DVIS": typer >> 18 & 1,
            "IDbits": (typer >> 19 & 0x1F) + 1, "A3V": typer >> 24 & 1, "No1N": typer >> 25 & 1,
            "RSS": typer >> 26 & 1}


def _annotate_gicv3(f: dict) -> dict:
    out = []
    for r in f["regs"]:
        e = {"group": VGIC_GROUP_NAMES.get(r["group"], str(r["group"])),
             "name": gic_attr_name(r), "value": f"0x{r['value']:x}"}
        if r["group"] in (5, 6, 7):
            m = r["mpidr"]
            e["affinity"] = f"{m >> 24 & 0xFF}.{m >> 16 & 0xFF}.{m >> 8 & 0xFF}.{m & 0xFF}"
        regs = {1: GICD_REGS, 5: GICR_REGS}.get(r["group"])
        if regs is not None:
            rng = gic_irq_range(regs, r["attr"])
            if rng is not None:
                e["intids"] = list(rng)
        if r["group"] == 1 and r["attr"] == 0x4:
            e["decoded"] = gicd_typer_info(r["value"])
        out.append(e)
    return {"regs": out}


def check_gicv2(buf) -> int:
    buf = bytes(buf)
    hdr, offs = _counted(buf, "arm64.gicv2", GicV2Header,
                         [("regs", "count", GicV2Attr, MAX_GICV2_ATTRS)])
    _exact_length(buf, "arm64.gicv2", offs[-1])
    return hdr["count"]


def _decode_gicv2(buf: bytes) -> dict:
    n = check_gicv2(buf)
    hsz = GicV2Header.sizeof()
    hdr = _clean(GicV2Header.parse(buf[:hsz]))
    hdr["regs"] = _records(buf, GICV2_ATTR_DTYPE, n, hsz)
    return hdr


def _annotate_gicv2(f: dict) -> dict:
    out = []
    for r in f["regs"]:
        regs = {1: GICV2_DIST_REGS, 2: GICV2_CPU_REGS}.get(r["group"])
        name = gic_reg_name(regs, r["offset"]) if regs else None
        if r["group"] == KVM_DEV_ARM_VGIC_GRP_NR_IRQS:
            name = "NR_IRQS"
        e = {"group": VGIC_GROUP_NAMES.get(r["group"], str(r["group"])),
             "name": name or f"+0x{r['offset']:x}", "value": f"0x{r['value']:08x}"}
        if regs is not None and gic_irq_range(regs, r["offset"]) is not None:
            e["intids"] = list(gic_irq_range(regs, r["offset"]))
        out.append(e)
    return {"regs": out}


# --- arm64.gic_blob -------------------------------------------------------------------

def check_gic_blob(buf) -> None:
    buf = bytes(buf)
    hdr, offs = _counted(buf, "arm64.gic_blob", GicBlobHeader,
                         [("icc", "icc_count", GicIccReg, MAX_GIC_ICC)])
    if hdr["blob_len"] > MAX_GIC_BLOB:
        raise LimitError(f"blob_len {hdr['blob_len']} > limit {MAX_GIC_BLOB}",
                         section="arm64.gic_blob", field="blob_len", offset=0, code="limit")
    _exact_length(buf, "arm64.gic_blob", offs[-1] + hdr["blob_len"])


def _decode_gic_blob(buf: bytes) -> dict:
    buf = bytes(buf)
    check_gic_blob(buf)
    hsz = GicBlobHeader.sizeof()
    hdr = _clean(GicBlobHeader.parse(buf[:hsz]))
    hdr["icc"] = _records(buf, GIC_ICC_DTYPE, hdr["icc_count"], hsz)
    start = hsz + hdr["icc_count"] * GicIccReg.sizeof()
    hdr["blob"] = buf[start:start + hdr["blob_len"]].hex()
    return hdr


def _annotate_gic_blob(f: dict) -> dict:
    return {"icc": [{"vcpu": r["vcpu"], "name": sysreg_name(r["reg"]),
                     "value": f"0x{r['value']:x}"} for r in f["icc"]]}


def _encode_gic_blob(fields: dict) -> bytes:
    if isinstance(fields, dict) and isinstance(fields.get("blob"), str):
        fields = dict(fields)
        n = len(fields["blob"]) // 2
        if fields.get("blob_len", n) != n:
            raise EncodeError(f"blob_len {fields['blob_len']} != {n} blob bytes",
                              section="arm64.gic_blob", field="blob_len")
        fields["blob_len"] = n
    return _encode_counted(GicBlob, "arm64.gic_blob", [("icc", "icc_count", MAX_GIC_ICC)],
                           _decode_gic_blob)(fields)


# --- fixed kinds ----------------------------------------------------------------------

def _annotate_vcpu_init(f: dict) -> dict:
    feats = [KVM_ARM_VCPU_FEATURES.get(32 * w + b, f"bit{32 * w + b}")
             for w, word in enumerate(f["features"]) for b in range(32) if word >> b & 1]
    return {"target": KVM_ARM_TARGET_NAMES.get(f["target"], str(f["target"])), "features": feats}


def _annotate_mp_state(f: dict) -> dict:
    return {"mp_state": KVM_MP_STATE_NAMES.get(f["mp_state"], str(f["mp_state"]))}


# =============================================================================
# Registration
# =============================================================================

def _kind(type_id, name, scope, decl, doc, kernel_struct, ioctl, **kw) -> SectionKind:
    return register(SectionKind(type_id, name, scope, decl, doc, arch=ARCH,
                                kernel_struct=kernel_struct, ioctl=ioctl, **kw))


VCPU_INIT = _kind(
    typeids.ARM64_VCPU_INIT, "arm64.vcpu_init", SCOPE_VCPU, KvmVcpuInit,
    "KVM_ARM_VCPU_INIT argument: target and feature bitmap the vCPU was created with.",
    "struct kvm_vcpu_init", "KVM_ARM_VCPU_INIT", annotate_fn=_annotate_vcpu_init)

MP_STATE = _kind(
    typeids.ARM64_MP_STATE, "arm64.mp_state", SCOPE_VCPU, KvmMpState,
    "vCPU power state (KVM_MP_STATE_RUNNABLE / STOPPED / SUSPENDED) + 4 reserved bytes.",
    "struct kvm_mp_state", "KVM_GET_MP_STATE", annotate_fn=_annotate_mp_state)

REGS = _kind(
    typeids.ARM64_VCPU_REGS, "arm64.regs", SCOPE_VCPU, OneRegs,
    "vCPU registers as KVM ONE_REG (id, value) records in KVM_GET_REG_LIST order: core "
    "(struct kvm_regs), system, timer, firmware registers.  value is 16 bytes "
    "little-endian (value_lo, value_hi); sizes U32/U64/U128 only.",
    None, "KVM_GET_ONE_REG",
    decode_fn=_decode_regs,
    encode_fn=_encode_counted(OneRegs, "arm64.regs", [("regs", "count", MAX_ONE_REGS)],
                              _decode_regs),
    annotate_fn=_annotate_regs, check_fn=check_regs,
    extra={"header": OneRegsHeader, "entry": OneReg, "count_field": "count",
           "entries_field": "regs", "max_count": MAX_ONE_REGS,
           "length_rule": (("min", 8), ("limit", 0, 4, MAX_ONE_REGS),
                           ("exact", 8, ((0, 4, 24),)))})

HVF_VCPU = _kind(
    typeids.ARM64_HVF_VCPU, "arm64.hvf_vcpu", SCOPE_VCPU, HvfVcpu,
    "macOS Hypervisor.framework vCPU: hv_reg_t, hv_sys_reg_t and hv_simd_fp_reg_t values, "
    "vtimer offset and mask, pending IRQ/FIQ.",
    None, "hv_vcpu_get_reg",
    decode_fn=_decode_hvf,
    encode_fn=_encode_counted(HvfVcpu, "arm64.hvf_vcpu",
                              [(a, cf, lim) for a, cf, _, lim in _HVF_ARRAYS], _decode_hvf),
    annotate_fn=_annotate_hvf,
    extra={"max_counts": {cf: lim for _, cf, _, lim in _HVF_ARRAYS},
           "length_rule": (("min", 24),) + tuple(("limit", 4 * i, 4, lim) for i, (_, _, _, lim)
                                                  in enumerate(_HVF_ARRAYS))
           + (("exact", 24, tuple((4 * i, 4, rec.sizeof()) for i, (_, _, rec, _)
                                  in enumerate(_HVF_ARRAYS))),)})

GICV3 = _kind(
    typeids.ARM64_GICV3, "arm64.gicv3", SCOPE_VM, GicV3,
    "In-kernel GICv3 (and ITS) state as KVM_{GET,SET}_DEVICE_ATTR records (group, mpidr, "
    "attr, value) in restore order; DIST/REDIST registers are 32-bit accesses, so 64-bit "
    "registers (GICD_IROUTER<n>, GICR_TYPER, ...) appear as two records (offset, offset+4).  "
    "ITS tables live in guest RAM (KVM_DEV_ARM_ITS_SAVE_TABLES).",
    None, "KVM_GET_DEVICE_ATTR",
    decode_fn=_decode_gicv3,
    encode_fn=_encode_counted(GicV3, "arm64.gicv3", [("regs", "count", MAX_GICV3_ATTRS)],
                              _decode_gicv3),
    annotate_fn=_annotate_gicv3, check_fn=check_gicv3,
    extra={"header": GicAttrsHeader, "entry": GicAttr, "count_field": "count",
           "entries_field": "regs", "max_count": MAX_GICV3_ATTRS,
           "length_rule": (("min", 8), ("limit", 0, 4, MAX_GICV3_ATTRS),
                           ("exact", 8, ((0, 4, 24),)))})

GICV2 = _kind(
    typeids.ARM64_GICV2, "arm64.gicv2", SCOPE_VM, GicV2,
    "In-kernel GICv2 state: base addresses, then (group, cpuid, offset, value) records of "
    "KVM_DEV_ARM_VGIC_GRP_DIST_REGS / CPU_REGS / NR_IRQS (all 32-bit).",
    None, "KVM_GET_DEVICE_ATTR",
    decode_fn=_decode_gicv2,
    encode_fn=_encode_counted(GicV2, "arm64.gicv2", [("regs", "count", MAX_GICV2_ATTRS)],
                              _decode_gicv2),
    annotate_fn=_annotate_gicv2, check_fn=check_gicv2,
    extra={"header": GicV2Header, "entry": GicV2Attr, "count_field": "count",
           "entries_field": "regs", "max_count": MAX_GICV2_ATTRS,
           "length_rule": (("min", 24), ("limit", 0, 4, MAX_GICV2_ATTRS),
                           ("exact", 24, ((0, 4, 16),)))})

GIC_BLOB = _kind(
    typeids.ARM64_GIC_BLOB, "arm64.gic_blob", SCOPE_VM, GicBlob,
    "Hypervisor.framework GIC: opaque hv_gic_state_get_data blob plus per-vCPU ICC "
    "registers (hv_gic_get_icc_reg), which the blob does not carry.",
    None, "hv_gic_state_get_data",
    decode_fn=_decode_gic_blob, encode_fn=_encode_gic_blob,
    annotate_fn=_annotate_gic_blob, check_fn=check_gic_blob,
    extra={"max_count": MAX_GIC_ICC, "max_blob": MAX_GIC_BLOB,
           "length_rule": (("min", 8), ("limit", 4, 4, MAX_GIC_ICC),
                           ("limit", 0, 4, MAX_GIC_BLOB),
                           ("exact", 8, ((4, 4, 16), (0, 4, 1))))})

del _n, _name
