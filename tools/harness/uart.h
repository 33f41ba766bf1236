/* 8250/16550A UART emulation for snapvm (COM1, 0x3f8, IRQ4). */
#ifndef SNAPVM_UART_H
#define SNAPVM_UART_H

#include <pthread.h>
#include <stdint.h>

#define UART_BASE      0x3f8
#define UART_NPORTS    8
#define UART_IRQ       4
#define UART_FIFO_SIZE 64

/*
 * Complete guest-visible UART state.  Plain data, fixed-width fields, no
 * pointers: this struct is what gets snapshotted (the shim will serialise
 * it as a device section).  Do not reorder without bumping UART_STATE_VERSION.
 */
#define UART_STATE_VERSION 1
struct uart_state {
	uint8_t ier;          /* interrupt enable (low 4 bits) */
	uint8_t lcr;          /* line control (bit 7 = DLAB) */
	uint8_t mcr;          /* modem control */
	uint8_t lsr_err;      /* sticky LSR error bits (overrun) */
	uint8_t msr;          /* modem status */
	uint8_t scr;          /* scratch */
	uint8_t dll;          /* divisor latch low */
	uint8_t dlm;          /* divisor latch high */
	uint8_t fcr;          /* last FIFO control written (bit 0 = FIFO on) */
	uint8_t thri_pending; /* THR-empty interrupt pending */
	uint8_t irq_level;    /* level last driven on the IRQ line */
	uint8_t rx_head;      /* index of oldest byte in rx_fifo */
	uint8_t rx_count;     /* bytes in rx_fifo */
	uint8_t pad[3];
	uint8_t rx_fifo[UART_FIFO_SIZE];
};

struct uart;
/* Called (from the vCPU thread) for each complete line the guest prints,
   without the trailing newline. */
typedef void (*uart_line_cb)(struct uart *u, const char *line, void *opaque);

struct uart {
	struct uart_state s;
	pthread_mutex_t lock;
	int vm_fd;            /* for KVM_IRQ_LINE; -1 = no irq */
	int out_fd;           /* guest output goes here; -1 = discard */
	char line[256];       /* output line assembly for line_cb */
	unsigned line_len;
	uart_line_cb line_cb;
	void *cb_opaque;
	int irq_error;        /* first KVM_IRQ_LINE errno, 0 if none */
};

void uart_init(struct uart *u, int vm_fd, int out_fd);
void uart_destroy(struct uart *u);
/* Port I/O from the vCPU thread. */
void uart_io(struct uart *u, uint16_t port, int is_write, uint8_t *data);
/* Host input: queue up to len bytes; returns how many were accepted. */
int uart_receive(struct uart *u, const uint8_t *buf, int len);
/* Free space in the RX FIFO. */
int uart_rx_space(struct uart *u);
/* Snapshot seam: copy the guest-visible state out / in.  uart_set_state
   re-drives the IRQ line only in the local struct: the KVM irqchip state
   is restored separately. */
void uart_get_state(struct uart *u, struct uart_state *out);
void uart_set_state(struct uart *u, const struct uart_state *in);

#endif
