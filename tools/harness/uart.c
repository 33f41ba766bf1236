/* 8250/16550A UART emulation: just enough for a polled/interrupt driven
   console.  Transmit is instantaneous; RX has a 64 byte FIFO. */
#include "uart.h"

#include <errno.h>
#include <linux/kvm.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define IER_RDI  0x01 /* received data available */
#define IER_THRI 0x02 /* THR empty */
#define LCR_DLAB 0x80
#define LSR_DR   0x01
#define LSR_OE   0x02
#define LSR_THRE 0x20
#define LSR_TEMT 0x40
#define IIR_NONE 0x01
#define IIR_THRI 0x02
#define IIR_RDI  0x04
#define IIR_FIFO 0xc0

void uart_init(struct uart *u, int vm_fd, int out_fd)
{
	memset(u, 0, sizeof(*u));
	pthread_mutex_init(&u->lock, NULL);
	u->vm_fd = vm_fd;
	u->out_fd = out_fd;
	u->s.msr = 0xb0; /* DCD DSR CTS */
	u->s.lcr = 0x03;
}

void uart_destroy(struct uart *u)
{
	pthread_mutex_destroy(&u->lock);
}

static int irq_wanted(const struct uart_state *s)
{
	return ((s->ier & IER_RDI) && s->rx_count) ||
	       ((s->ier & IER_THRI) && s->thri_pending);
}

/* caller holds lock */
static void update_irq(struct uart *u)
{
	uint8_t level = (uint8_t)irq_wanted(&u->s);

	if (level == u->s.irq_level)
		return;
	u->s.irq_level = level;
	if (u->vm_fd < 0)
		return;
	struct kvm_irq_level irq = {.irq = UART_IRQ, .level = level};
	if (ioctl(u->vm_fd, KVM_IRQ_LINE, &irq) < 0 && !u->irq_error)
		u->irq_error = errno ? errno : EIO;
}

static void emit(struct uart *u, uint8_t c)
{
	if (u->out_fd >= 0) {
		/* Best effort; a closed peer must not kill the VM. */
		for (int tries = 0; tries < 100; tries++) {
			ssize_t n = write(u->out_fd, &c, 1);
			if (n == 1 || (n < 0 && errno != EINTR && errno != EAGAIN))
				break;
		}
	}
	if (c == '\n' || c == '\r') {
		if (c == '\n') {
			u->line[u->line_len] = 0;
			if (u->line_cb)
				u->line_cb(u, u->line, u->cb_opaque);
		}
		u->line_len = 0;
	} else if (u->line_len < sizeof(u->line) - 1) {
		u->line[u->line_len++] = (char)c;
	}
}

static uint8_t rx_pop(struct uart_state *s)
{
	if (!s->rx_count)
		return 0;
	uint8_t c = s->rx_fifo[s->rx_head];
	s->rx_head = (uint8_t)((s->rx_head + 1) % UART_FIFO_SIZE);
	s->rx_count--;
	return c;
}

void uart_io(struct uart *u, uint16_t port, int is_write, uint8_t *data)
{
	struct uart_state *s = &u->s;
	unsigned reg = (unsigned)(port - UART_BASE) & 7;
	int dlab = !!(s->lcr & LCR_DLAB);

	pthread_mutex_lock(&u->lock);
	if (is_write) {
		uint8_t v = *data;
		switch (reg) {
		case 0:
			if (dlab) {
				s->dll = v;
			} else {
				emit(u, v);
				s->thri_pending = 1;
			}
			break;
		case 1:
			if (dlab) {
				s->dlm = v;
			} else {
				/* enabling THRI with an empty THR raises it */
				if ((v & IER_THRI) && !(s->ier & IER_THRI))
					s->thri_pending = 1;
				s->ier = v & 0x0f;
			}
			break;
		case 2:
			s->fcr = v & 0xc9;
			if (v & 0x02) {
				s->rx_head = 0;
				s->rx_count = 0;
			}
			break;
		case 3:
			s->lcr = v;
			break;
		case 4:
			s->mcr = v & 0x1f;
			break;
		case 7:
			s->scr = v;
			break;
		default: /* LSR/MSR are read only */
			break;
		}
	} else {
		uint8_t v = 0xff;
		switch (reg) {
		case 0:
			v = dlab ? s->dll : rx_pop(s);
			break;
		case 1:
			v = dlab ? s->dlm : s->ier;
			break;
		case 2:
			if ((s->ier & IER_RDI) && s->rx_count) {
				v = IIR_RDI;
			} else if ((s->ier & IER_THRI) && s->thri_pending) {
				v = IIR_THRI;
				s->thri_pending = 0; /* reading IIR clears THRI */
			} else {
				v = IIR_NONE;
			}
			if (s->fcr & 1)
				v |= IIR_FIFO;
			break;
		case 3:
			v = s->lcr;
			break;
		case 4:
			v = s->mcr;
			break;
		case 5:
			v = LSR_THRE | LSR_TEMT | s->lsr_err |
			    (s->rx_count ? LSR_DR : 0);
			s->lsr_err = 0;
			break;
		case 6:
			v = s->msr;
			break;
		case 7:
			v = s->scr;
			break;
		}
		*data = v;
	}
	update_irq(u);
	pthread_mutex_unlock(&u->lock);
}

int uart_rx_space(struct uart *u)
{
	pthread_mutex_lock(&u->lock);
	int space = UART_FIFO_SIZE - u->s.rx_count;
	pthread_mutex_unlock(&u->lock);
	return space;
}

int uart_receive(struct uart *u, const uint8_t *buf, int len)
{
	struct uart_state *s = &u->s;
	int n = 0;

	pthread_mutex_lock(&u->lock);
	while (n < len && s->rx_count < UART_FIFO_SIZE) {
		s->rx_fifo[(s->rx_head + s->rx_count) % UART_FIFO_SIZE] = buf[n++];
		s->rx_count++;
	}
	update_irq(u);
	pthread_mutex_unlock(&u->lock);
	return n;
}

void uart_get_state(struct uart *u, struct uart_state *out)
{
	pthread_mutex_lock(&u->lock);
	*out = u->s;
	pthread_mutex_unlock(&u->lock);
}

void uart_set_state(struct uart *u, const struct uart_state *in)
{
	pthread_mutex_lock(&u->lock);
	u->s = *in;
	u->s.rx_head %= UART_FIFO_SIZE;
	if (u->s.rx_count > UART_FIFO_SIZE)
		u->s.rx_count = UART_FIFO_SIZE;
	pthread_mutex_unlock(&u->lock);
}
