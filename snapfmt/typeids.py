"""Section type ids: the one allocation table (ids are forever; never reuse).

Ranges: 0x0001-0x00ff container/global, 0x0100-0x01ff x86_64 KVM,
0x0200-0x02ff aarch64, 0x0300-0x03ff devices, 0x0400-0x04ff layering,
0xf0000000-0xffffffff private/experimental (never CRITICAL in shipped files).
"""

# container / global
METADATA = 0x0001
MEMORY_LAYOUT = 0x0002
RAM = 0x0003                 # bulk guest RAM blob; instance = blob id

# x86_64 per vCPU (instance = vCPU index)
X86_CPUID2 = 0x0100
X86_MP_STATE = 0x0101
X86_REGS = 0x0102
X86_SREGS = 0x0103
X86_XSAVE = 0x0104
X86_XCRS = 0x0105
X86_DEBUGREGS = 0x0106
X86_LAPIC = 0x0107
X86_MSRS = 0x0108
X86_VCPU_EVENTS = 0x0109
X86_TSC_KHZ = 0x010A

# x86_64 per VM
X86_PIT2 = 0x0180
X86_CLOCK = 0x0181
X86_PIC = 0x0182             # instance 0 = master, 1 = slave (kvm_irqchip chip_id)
X86_IOAPIC = 0x0183          # kvm_irqchip chip_id 2
X86_GSI_ROUTING = 0x0184     # KVM_SET_GSI_ROUTING table

# aarch64
ARM64_VCPU_INIT = 0x0200
ARM64_VCPU_REGS = 0x0201     # ONE_REG (id, value) pairs
ARM64_MP_STATE = 0x0202
ARM64_HVF_VCPU = 0x0203      # macOS Hypervisor.framework registers
ARM64_GICV3 = 0x0280
ARM64_GICV2 = 0x0281
ARM64_GIC_BLOB = 0x0282      # hv_gic_state_get_data opaque blob + ICC regs

# devices (instance = device index)
VIRTIO_MMIO = 0x0300         # device + its queues
VIRTIOFS_INODE_MAP = 0x0301  # passthrough server state
UART_8250 = 0x0302           # emulated 8250 UART registers

# layering
PARENT_REF = 0x0400          # diff layer: parent digest + dirty bitmap

# private / tests
PRIVATE_BASE = 0xF0000000
