"""Device section ``uart.8250``: the emulated 8250/16550A UART (COM1) registers.

Scope device (instance = UART index; 0 = COM1).  The bytes are exactly the
VMM's ``struct uart_state`` (tools/harness/uart.h, UART_STATE_VERSION 1):
sixteen one-byte registers/counters then the 64-byte receive FIFO, 80 bytes.
The RX FIFO is a ring: ``rx_count`` bytes starting at ``rx_head`` (mod 64).
The IRQ line level is the one last driven (the in-kernel PIC/IOAPIC state is in
``x86.pic`` / ``x86.ioapic``; a restoring VMM does not re-drive it).
"""

from __future__ import annotations

import construct as c

from . import typeids
from .decl import HexBytes
from .errors import FormatError
from .registry import SCOPE_DEVICE, SectionKind, register

UART_FIFO_SIZE = 64

Uart8250 = c.Struct(
    "ier" / c.Int8ul,           # interrupt enable register (low 4 bits)
    "lcr" / c.Int8ul,           # line control (bit 7 = DLAB)
    "mcr" / c.Int8ul,           # modem control
    "lsr_err" / c.Int8ul,       # sticky LSR error bits (overrun)
    "msr" / c.Int8ul,           # modem status
    "scr" / c.Int8ul,           # scratch register
    "dll" / c.Int8ul,           # divisor latch low
    "dlm" / c.Int8ul,           # divisor latch high
    "fcr" / c.Int8ul,           # last FIFO control written (bit 0 = FIFO enabled)
    "thri_pending" / c.Int8ul,  # THR-empty interrupt pending (0/1)
    "irq_level" / c.Int8ul,     # level last driven on the IRQ line (0/1)
    "rx_head" / c.Int8ul,       # index of the oldest byte in rx_fifo (< 64)
    "rx_count" / c.Int8ul,      # bytes queued in rx_fifo (<= 64)
    "pad" / HexBytes(3),        # zero
    "rx_fifo" / HexBytes(UART_FIFO_SIZE),  # receive FIFO ring
)


def _check_uart(buf: bytes) -> None:
    if len(buf) != Uart8250.sizeof():
        raise FormatError(f"length {len(buf)} != declared size {Uart8250.sizeof()}",
                          section="uart.8250", code="bad-length")
    head, count = buf[11], buf[12]
    if head >= UART_FIFO_SIZE or count > UART_FIFO_SIZE:
        raise FormatError(f"rx_head {head} / rx_count {count} outside the {UART_FIFO_SIZE}-byte "
                          "FIFO", section="uart.8250", field="rx_count", code="bad-value")


def _annotate_uart(f: dict) -> dict:
    fifo = bytes.fromhex(f["rx_fifo"])
    pending = bytes(fifo[(f["rx_head"] + i) % UART_FIFO_SIZE] for i in range(min(f["rx_count"], 64)))
    return {"divisor": f["dlm"] << 8 | f["dll"], "dlab": bool(f["lcr"] & 0x80),
            "fifo_enabled": bool(f["fcr"] & 1), "rx_pending": pending.decode("latin-1")}


UART_8250 = register(SectionKind(
    typeids.UART_8250, "uart.8250", SCOPE_DEVICE, Uart8250,
    "Emulated 8250/16550A UART registers and receive FIFO (struct uart_state v1).",
    annotate_fn=_annotate_uart, check_fn=_check_uart,
    extra={"length_rule": (("value_max", 11, 1, UART_FIFO_SIZE - 1),
                           ("value_max", 12, 1, UART_FIFO_SIZE))}))
