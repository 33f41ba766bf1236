/*
 * snapfmt test guest: a tiny 64-bit program used to exercise VM snapshot /
 * restore.  It is loaded flat at 1 MiB (LOAD_ADDR) and has two entry points:
 *
 *   entry64  – entered directly in 64-bit long mode by our harness (snapvm),
 *              which has already built identity page tables at PT_BASE.
 *   entry32  – multiboot (v1, "a.out kludge") entry used by QEMU's -kernel:
 *              32-bit protected mode, paging off.  Builds the same identity
 *              page tables, enables long mode and jumps to entry64.
 *
 * Header at offset 0x40 of the image ("SNAPGST1", entry64, image end,
 * flags) lets the harness find entry64 without parsing ELF; the harness may
 * set flags bit 0 to allow AVX.
 *
 * After init the guest prints READY and sits in a `sti; hlt` loop.  Serial
 * (8250 at 0x3f8, RX interrupt on IRQ4 via IOAPIC pin 4) delivers line based
 * commands:
 *   PING           -> PONG <hex>   checksum over fixed GPRs (rbx rbp r12-r15),
 *                                  XMM/YMM 0-15, STAR/LSTAR/SFMASK, 64 KiB
 *                                  pattern region
 *   COMP <hex n>   -> RESULT <hex> n rounds of a hash over a 1 MiB buffer
 *   WRITE <hex v>  -> OK           store v in the private page
 *   READ           -> VALUE <hex>  value of the private page
 *   STAT           -> STAT pit=<hex> lapic=<hex> tsc=<hex> (tick counters and
 *                                  TSC delta since init; they must keep
 *                                  increasing after a restore)
 * Unknown lines -> "ERR".
 *
 * Interrupts: PIT (IRQ0) through the 8259 PIC -> LAPIC LINT0 (ExtINT),
 * vector 0x20; UART IRQ4 through IOAPIC pin 4 -> vector 0x44 (PIC IRQ4 is
 * masked); LAPIC timer periodic, vector 0x40.  Handlers only touch the
 * registers they save, and never vector registers, so the "fixed" register
 * values survive.
 *
 * Before READY it prints "INFO xsave=<0|1> avx=<0|1>".  AVX/YMM is used
 * only when header flag bit 0 is set AND CPUID reports it; otherwise XMM
 * only.  The guest never executes xgetbv/xsave itself: under kvm_pvm any
 * VEX/xgetbv/xsave instruction ends in a KVM emulation failure, and CPUID
 * masking isn't honoured, hence the opt-in flag.
 *
 * Privilege split: init, interrupt handlers and syscalls run in ring 0;
 * the main program (idle loop, commands, COMP, checksum, UART output via
 * IOPL 3) runs in ring 3.  Reason: under kvm_pvm only ring-3 code executes
 * natively, ring-0 code is emulated instruction by instruction.  Idle =
 * SYS_WAIT system call (int $0x80; sti;hlt in the kernel).
 *
 * Register convention in the main loop: rbx, rbp, r12-r15 and xmm/ymm0-15
 * hold fixed values set in init and are never modified afterwards.
 */

#define LOAD_ADDR     0x100000
#define PT_BASE       0x9000          /* PML4; PDPT +0x1000; 4 PDs +0x2000.. */
#define PATTERN_ADDR  0x200000        /* 64 KiB checksummed pattern          */
#define PATTERN_SIZE  0x10000
#define PRIV_ADDR     0x300000        /* private page for WRITE/READ         */
#define COMP_ADDR     0x400000        /* 1 MiB COMP buffer                   */
#define COMP_QWORDS   (0x100000 / 8)

#define COM1          0x3f8
#define LAPIC_BASE    0xfee00000
#define IOAPIC_BASE   0xfec00000

#define SEL_KCODE     0x08
#define SEL_KDATA     0x10
#define SEL_UDATA     0x20
#define SEL_UCODE     0x28
#define SEL_TSS       0x30

#define SYS_NOP       0
#define SYS_WAIT      1
#define SYS_DONE      2
#define SYS_RDMSR     3
#define SYS_WRITE     4

#define VEC_PIT       0x20
#define VEC_LAPIC_TMR 0x40
#define VEC_UART      0x44
#define VEC_SYSCALL   3
#define VEC_SPURIOUS  0xff

#define MSR_EFER      0xc0000080
#define MSR_STAR      0xc0000081
#define MSR_LSTAR     0xc0000082
#define MSR_SFMASK    0xc0000084

#define STAR_VALUE    0x00180008c0ffee00   /* sysret base 0x18 (CS 0x2b SS 0x23),
                                              syscall CS 0x08 SS 0x10 */
#define SFMASK_VALUE  0x0000000000047700

#define MB_MAGIC      0x1badb002
#define MB_FLAGS      0x00010000           /* bit16: address fields valid */

#define GOLDEN        0x9e3779b97f4a7c15

/* system call from ring 3 (see isr_syscall) */
.macro SYSCALL
	int3
.endm

/* h = (h ^ v) * GOLDEN; h ^= h >> 29   (h in %rax, clobbers \tmp) */
.macro MIX v, tmp
	xor	\v, %rax
	movabs	$GOLDEN, \tmp
	imul	\tmp, %rax
	mov	%rax, \tmp
	shr	$29, \tmp
	xor	\tmp, %rax
.endm

	.section .head, "ax"
	.code32
	.globl	_start
_start:
mb_header:                                 /* multiboot v1 header */
	.long	MB_MAGIC
	.long	MB_FLAGS
	.long	(0 - (MB_MAGIC + MB_FLAGS)) & 0xffffffff
	.long	mb_header                  /* header_addr   */
	.long	_start                     /* load_addr     */
	.long	_edata                     /* load_end_addr */
	.long	_end                       /* bss_end_addr  */
	.long	entry32                    /* entry_addr    */

	.balign	64
snap_header:                               /* read by the harness */
	.ascii	"SNAPGST1"
	.quad	entry64
	.quad	_end
guest_flags:                               /* bit 0: may use AVX */
	.quad	0

/* ---------------------------------------------------------------- 32 bit */
	.balign	16
entry32:
	cli
	cld
	lgdt	gdt_ptr
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	/* zero PML4, PDPT and the 4 PDs */
	mov	$PT_BASE, %edi
	xor	%eax, %eax
	mov	$(6 * 4096 / 4), %ecx
	rep stosl
	movl	$(PT_BASE + 0x1000 + 7), PT_BASE
	movl	$(PT_BASE + 0x2000 + 7), PT_BASE + 0x1000
	movl	$(PT_BASE + 0x3000 + 7), PT_BASE + 0x1008
	movl	$(PT_BASE + 0x4000 + 7), PT_BASE + 0x1010
	movl	$(PT_BASE + 0x5000 + 7), PT_BASE + 0x1018
	/* 2048 x 2 MiB pages = 4 GiB identity, user accessible (the main
	   program runs in ring 3); uncached from 3 GiB (MMIO) */
	mov	$(PT_BASE + 0x2000), %edi
	xor	%ecx, %ecx
1:	mov	%ecx, %eax
	shl	$21, %eax
	or	$0x87, %eax                /* P | RW | US | PS */
	cmp	$1536, %ecx
	jb	2f
	or	$0x18, %eax                /* PWT | PCD */
2:	mov	%eax, (%edi,%ecx,8)
	inc	%ecx
	cmp	$2048, %ecx
	jb	1b
	mov	%cr4, %eax
	or	$0x20, %eax                /* PAE */
	mov	%eax, %cr4
	mov	$PT_BASE, %eax
	mov	%eax, %cr3
	mov	$MSR_EFER, %ecx
	rdmsr
	or	$0x100, %eax               /* LME */
	wrmsr
	mov	%cr0, %eax
	or	$0x80000001, %eax          /* PG | PE */
	mov	%eax, %cr0
	ljmp	$0x08, $entry64

/* ---------------------------------------------------------------- 64 bit */
	.code64
	.text
	.globl	entry64
entry64:
	cli
	cld
	lgdt	gdt_ptr(%rip)
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	%ax, %fs
	mov	%ax, %gs
	lea	stack_top(%rip), %rsp
	pushq	$0x08                      /* reload CS from our own GDT */
	lea	1f(%rip), %rax
	push	%rax
	lretq
1:
	/* zero .bss */
	lea	__bss_start(%rip), %rdi
	lea	_end(%rip), %rcx
	sub	%rdi, %rcx
	xor	%eax, %eax
	rep stosb

	call	uart_init
	call	idt_init
	call	fpu_init
	call	msr_init
	call	pattern_init
	call	pic_init
	call	ioapic_init
	call	lapic_init
	call	pit_init

	call	tss_init

	rdtsc
	shl	$32, %rdx
	or	%rdx, %rax
	mov	%rax, tsc0(%rip)

	/* drop to ring 3 with IOPL 3 (port I/O allowed) and IF=1 */
	pushq	$(SEL_UDATA | 3)
	lea	user_stack_top(%rip), %rax
	push	%rax
	pushq	$0x3202                    /* IOPL=3 | IF | reserved bit 1 */
	pushq	$(SEL_UCODE | 3)
	lea	user_main(%rip), %rax
	push	%rax
	iretq

/*
 * Ring 3 main program.  Under kvm_pvm only ring-3 code runs natively (ring-0
 * code is emulated, ~1000x slower), so all real work happens here; the
 * ring-0 part is interrupt handlers and a few syscalls.
 */
user_main:
	mov	$SYS_NOP, %eax             /* check the ring 3 -> 0 path */
	SYSCALL
	cmpq	$1, syscall_count(%rip)
	je	1f
	lea	str_err_syscall(%rip), %rsi
	call	puts
1:
	/* fixed general registers (part of the PING checksum) */
	movabs	$0x1111111111111111, %rbx
	movabs	$0x2222222222222222, %rbp
	movabs	$0x3333333333333333, %r12
	movabs	$0x4444444444444444, %r13
	movabs	$0x5555555555555555, %r14
	movabs	$0x6666666666666666, %r15

	lea	str_info(%rip), %rsi
	call	puts
	movzbl	have_xsave(%rip), %eax
	add	$'0', %al
	call	putc
	lea	str_info_avx(%rip), %rsi
	call	puts
	movzbl	have_avx(%rip), %eax
	add	$'0', %al
	call	putc
	call	newline
	lea	str_ready(%rip), %rsi
	call	puts

/* idle loop: sleep (in the kernel) until a command line is complete */
idle:
	mov	$SYS_WAIT, %eax
	SYSCALL
	call	do_command
	mov	$SYS_DONE, %eax            /* release the line, take queued input */
	SYSCALL
	jmp	idle

/* ------------------------------------------------------------- serial */
uart_init:
	mov	$COM1 + 1, %dx
	xor	%al, %al
	out	%al, %dx                   /* IER = 0 */
	mov	$COM1 + 3, %dx
	mov	$0x80, %al
	out	%al, %dx                   /* LCR: DLAB */
	mov	$COM1 + 0, %dx
	mov	$1, %al
	out	%al, %dx                   /* DLL = 1 (115200) */
	mov	$COM1 + 1, %dx
	xor	%al, %al
	out	%al, %dx                   /* DLM = 0 */
	mov	$COM1 + 3, %dx
	mov	$0x03, %al
	out	%al, %dx                   /* LCR: 8N1 */
	mov	$COM1 + 2, %dx
	mov	$0x07, %al
	out	%al, %dx                   /* FCR: FIFO on, clear, trigger 1 */
	mov	$COM1 + 4, %dx
	mov	$0x0b, %al
	out	%al, %dx                   /* MCR: DTR RTS OUT2 */
	mov	$COM1 + 0, %dx             /* drain stale input */
	mov	$64, %ecx
1:	in	%dx, %al
	loop	1b
	mov	$COM1 + 1, %dx
	mov	$0x01, %al
	out	%al, %dx                   /* IER: RX data available */
	ret

/*
 * putc: append %al to the output line; '\n' (or a full buffer) sends the
 * line: from ring 3 via SYS_WRITE (port I/O faults in ring 3 under kvm_pvm
 * even with IOPL 3), from ring 0 directly.  Clobbers %rdx only.
 */
putc:
	push	%rcx
	push	%rax
	push	%rsi
	push	%r11
	movzbl	out_len(%rip), %ecx
	lea	out_buf(%rip), %rsi
	mov	%al, (%rsi,%rcx)
	inc	%ecx
	cmp	$'\n', %al
	je	1f
	cmp	$255, %ecx
	jb	2f
1:	mov	%ecx, %edx                 /* rsi = buf, rdx = len */
	movb	$0, out_len(%rip)
	mov	%cs, %ax
	test	$3, %al
	jz	3f
	mov	$SYS_WRITE, %eax
	SYSCALL
	jmp	4f
3:	call	kwrite
	jmp	4f
2:	mov	%cl, out_len(%rip)
4:	pop	%r11
	pop	%rsi
	pop	%rax
	pop	%rcx
	ret

/* kwrite (ring 0): send rdx bytes at rsi; waits (bounded) for THRE, then
   pushes up to 16 bytes (the 16550 TX FIFO) with one rep outsb.
   Clobbers rax rcx rdx rsi. */
kwrite:
	push	%rdi
	mov	%rdx, %rdi                 /* bytes left */
1:	test	%rdi, %rdi
	jz	4f
	mov	$COM1 + 5, %dx
	mov	$100000, %ecx
2:	in	%dx, %al
	test	$0x20, %al
	jnz	3f
	loop	2b
3:	mov	$16, %ecx
	cmp	%rcx, %rdi
	cmovb	%rdi, %rcx
	sub	%rcx, %rdi
	mov	$COM1, %dx
	rep outsb
	jmp	1b
4:	pop	%rdi
	ret

/* puts: NUL-terminated string at %rsi; clobbers rax rdx rsi */
puts:
1:	lodsb
	test	%al, %al
	jz	2f
	call	putc
	jmp	1b
2:	ret

/* puthex: %rdi as 16 hex digits; clobbers rax rcx rdx rdi */
puthex:
	mov	$16, %ecx
1:	rol	$4, %rdi
	mov	%edi, %eax
	and	$0xf, %eax
	lea	hexdigits(%rip), %rdx
	mov	(%rdx,%rax), %al
	call	putc
	dec	%ecx
	jnz	1b
	ret

newline:
	mov	$'\n', %al
	jmp	putc

/* parse_hex: %rsi -> %rax (stops at first non-hex char); clobbers rcx */
parse_hex:
	xor	%eax, %eax
1:	movzbl	(%rsi), %ecx
	sub	$'0', %ecx
	cmp	$9, %ecx
	jbe	2f
	movzbl	(%rsi), %ecx
	or	$0x20, %ecx                /* lower case */
	sub	$'a', %ecx
	cmp	$5, %ecx
	ja	3f
	add	$10, %ecx
2:	shl	$4, %rax
	or	%rcx, %rax
	inc	%rsi
	jmp	1b
3:	ret

/* ------------------------------------------------------------ commands */
/* starts_with: does cmd_buf start with string %rdi?  ZF=1 if yes;
   on match %rsi points past the prefix.  clobbers rax rsi rdi */
starts_with:
	lea	cmd_buf(%rip), %rsi
1:	mov	(%rdi), %al
	test	%al, %al
	jz	2f                         /* ZF=1: end of prefix, match */
	cmp	(%rsi), %al
	jne	2f                         /* ZF=0: mismatch */
	inc	%rdi
	inc	%rsi
	jmp	1b
2:	ret

do_command:
	lea	str_cmd_ping(%rip), %rdi
	call	starts_with
	je	cmd_ping
	lea	str_cmd_comp(%rip), %rdi
	call	starts_with
	je	cmd_comp
	lea	str_cmd_write(%rip), %rdi
	call	starts_with
	je	cmd_write
	lea	str_cmd_read(%rip), %rdi
	call	starts_with
	je	cmd_read
	lea	str_cmd_stat(%rip), %rdi
	call	starts_with
	je	cmd_stat
	lea	str_err(%rip), %rsi
	jmp	puts

cmd_ping:
	call	checksum
	mov	%rax, %r8
	lea	str_pong(%rip), %rsi
	call	puts
	mov	%r8, %rdi
	call	puthex
	jmp	newline

cmd_write:
	call	parse_hex
	mov	%rax, PRIV_ADDR
	lea	str_ok(%rip), %rsi
	jmp	puts

cmd_read:
	lea	str_value(%rip), %rsi
	call	puts
	mov	PRIV_ADDR, %rdi
	call	puthex
	jmp	newline

cmd_stat:
	lea	str_stat_pit(%rip), %rsi
	call	puts
	mov	pit_ticks(%rip), %rdi
	call	puthex
	lea	str_stat_lapic(%rip), %rsi
	call	puts
	mov	lapic_ticks(%rip), %rdi
	call	puthex
	lea	str_stat_tsc(%rip), %rsi
	call	puts
	rdtsc
	shl	$32, %rdx
	or	%rdx, %rax
	sub	tsc0(%rip), %rax
	mov	%rax, %rdi
	call	puthex
	jmp	newline

/*
 * COMP n: deterministic hash over the 1 MiB buffer.  Progress lives in
 * registers (r8 = rounds left, r9 = index, rax = hash) and in memory (the
 * buffer is rewritten every round), so a snapshot taken midway must resume
 * to the same RESULT.
 */
cmd_comp:
	call	parse_hex
	mov	%rax, %r8                  /* rounds */
	/* buf[j] = j * GOLDEN */
	mov	$COMP_ADDR, %rdi
	xor	%r9d, %r9d
	movabs	$GOLDEN, %r10
1:	mov	%r9, %rax
	imul	%r10, %rax
	mov	%rax, (%rdi,%r9,8)
	inc	%r9
	cmp	$COMP_QWORDS, %r9
	jb	1b
	movabs	$0xcbf29ce484222325, %rax  /* hash state */
	test	%r8, %r8
	jz	4f
2:	xor	%r9d, %r9d
3:	mov	(%rdi,%r9,8), %r11
	MIX	%r11, %rcx
	add	%r9, %rax
	mov	%rax, (%rdi,%r9,8)
	inc	%r9
	cmp	$COMP_QWORDS, %r9
	jb	3b
	dec	%r8
	jnz	2b
4:	mov	%rax, %r8
	lea	str_result(%rip), %rsi
	call	puts
	mov	%r8, %rdi
	call	puthex
	jmp	newline

/*
 * checksum -> %rax over: the fixed GPRs, vector registers (ymm0-15 if AVX
 * else xmm0-15), STAR/LSTAR/SFMASK, and the 64 KiB pattern region.
 * Uses only rax rcx rdx rsi rdi r8 r9 (never the fixed registers).
 */
checksum:
	movabs	$0xcbf29ce484222325, %rax
	MIX	%rbx, %rcx
	MIX	%rbp, %rcx
	MIX	%r12, %rcx
	MIX	%r13, %rcx
	MIX	%r14, %rcx
	MIX	%r15, %rcx
	mov	%rax, %r8
	lea	vecsave(%rip), %rdi
	cmpb	$0, have_avx(%rip)
	je	1f
	vmovdqu	%ymm0, 0x000(%rdi)
	vmovdqu	%ymm1, 0x020(%rdi)
	vmovdqu	%ymm2, 0x040(%rdi)
	vmovdqu	%ymm3, 0x060(%rdi)
	vmovdqu	%ymm4, 0x080(%rdi)
	vmovdqu	%ymm5, 0x0a0(%rdi)
	vmovdqu	%ymm6, 0x0c0(%rdi)
	vmovdqu	%ymm7, 0x0e0(%rdi)
	vmovdqu	%ymm8, 0x100(%rdi)
	vmovdqu	%ymm9, 0x120(%rdi)
	vmovdqu	%ymm10, 0x140(%rdi)
	vmovdqu	%ymm11, 0x160(%rdi)
	vmovdqu	%ymm12, 0x180(%rdi)
	vmovdqu	%ymm13, 0x1a0(%rdi)
	vmovdqu	%ymm14, 0x1c0(%rdi)
	vmovdqu	%ymm15, 0x1e0(%rdi)
	mov	$64, %ecx                  /* 512 bytes */
	jmp	2f
1:	movdqu	%xmm0, 0x000(%rdi)
	movdqu	%xmm1, 0x010(%rdi)
	movdqu	%xmm2, 0x020(%rdi)
	movdqu	%xmm3, 0x030(%rdi)
	movdqu	%xmm4, 0x040(%rdi)
	movdqu	%xmm5, 0x050(%rdi)
	movdqu	%xmm6, 0x060(%rdi)
	movdqu	%xmm7, 0x070(%rdi)
	movdqu	%xmm8, 0x080(%rdi)
	movdqu	%xmm9, 0x090(%rdi)
	movdqu	%xmm10, 0x0a0(%rdi)
	movdqu	%xmm11, 0x0b0(%rdi)
	movdqu	%xmm12, 0x0c0(%rdi)
	movdqu	%xmm13, 0x0d0(%rdi)
	movdqu	%xmm14, 0x0e0(%rdi)
	movdqu	%xmm15, 0x0f0(%rdi)
	mov	$32, %ecx                  /* 256 bytes */
2:	mov	%rax, %r8
	mov	%rcx, %r9
	mov	%rdi, %rsi
	call	hash_qwords                /* r8 = hash, rsi/r9 = buf/count */
	/* syscall MSRs */
	mov	$MSR_STAR, %ecx
	call	mix_msr
	mov	$MSR_LSTAR, %ecx
	call	mix_msr
	mov	$MSR_SFMASK, %ecx
	call	mix_msr
	/* pattern region */
	mov	$PATTERN_ADDR, %esi
	mov	$(PATTERN_SIZE / 8), %r9d
	call	hash_qwords
	mov	%r8, %rax
	ret

/* r8 = mix(r8, MSR[ecx]) (read via SYS_RDMSR); clobbers rax rcx rdx rdi */
mix_msr:
	mov	%ecx, %edi
	mov	$SYS_RDMSR, %eax
	SYSCALL
	mov	%rax, %rdx
	mov	%r8, %rax
	MIX	%rdx, %rcx
	mov	%rax, %r8
	ret

/* r8 = mix over r9 qwords at rsi; clobbers rax rcx rdx rsi r9 */
hash_qwords:
	mov	%r8, %rax
	test	%r9, %r9
	jz	2f
1:	mov	(%rsi), %rdx
	MIX	%rdx, %rcx
	add	$8, %rsi
	dec	%r9
	jnz	1b
2:	mov	%rax, %r8
	ret

/* --------------------------------------------------------- FPU / AVX */
fpu_init:
	mov	%cr0, %rax
	and	$~0xc, %rax                /* clear EM, TS */
	or	$0x22, %rax                /* MP, NE */
	mov	%rax, %cr0
	mov	%cr4, %rax
	or	$0x600, %rax               /* OSFXSR | OSXMMEXCPT */
	mov	%rax, %cr4
	fninit
	mov	$1, %eax
	cpuid
	bt	$26, %ecx                  /* XSAVE */
	jnc	1f
	mov	%ecx, %r8d
	mov	%cr4, %rax
	bts	$18, %rax                  /* OSXSAVE */
	mov	%rax, %cr4
	movb	$1, have_xsave(%rip)
	mov	$3, %eax                   /* XCR0 = x87 | SSE ... */
	bt	$28, %r8d                   /* AVX */
	jnc	0f
	testb	$1, guest_flags(%rip)      /* AVX allowed by the loader? */
	jz	0f
	or	$4, %eax                    /* ... | AVX */
	movb	$1, have_avx(%rip)
0:	/* ... | PKRU when XCR0 can hold it (as Linux does): KVM_GET_XSAVE
	   reports the PKRU component whatever XCR0 says, so enabling it keeps
	   XSTATE_BV within XCR0 (snapfmt validate x86-xsave-bv-not-in-xcr0) */
	mov	%eax, %r9d
	push	%rbx
	mov	$0xd, %eax
	xor	%ecx, %ecx
	cpuid
	pop	%rbx
	and	$0x200, %eax
	or	%r9d, %eax
	xor	%ecx, %ecx
	xor	%edx, %edx
	xsetbv
1:	/* distinctive vector values: byte k of reg i = i * 0x10 + k + 1 */
	lea	vecsave(%rip), %rdi
	xor	%ecx, %ecx
2:	lea	1(%rcx), %eax
	mov	%ecx, %edx
	shr	$5, %edx                   /* register number */
	shl	$4, %edx
	add	%edx, %eax
	mov	%al, (%rdi,%rcx)
	inc	%ecx
	cmp	$512, %ecx
	jb	2b
	cmpb	$0, have_avx(%rip)
	je	3f
	vmovdqu	0x000(%rdi), %ymm0
	vmovdqu	0x020(%rdi), %ymm1
	vmovdqu	0x040(%rdi), %ymm2
	vmovdqu	0x060(%rdi), %ymm3
	vmovdqu	0x080(%rdi), %ymm4
	vmovdqu	0x0a0(%rdi), %ymm5
	vmovdqu	0x0c0(%rdi), %ymm6
	vmovdqu	0x0e0(%rdi), %ymm7
	vmovdqu	0x100(%rdi), %ymm8
	vmovdqu	0x120(%rdi), %ymm9
	vmovdqu	0x140(%rdi), %ymm10
	vmovdqu	0x160(%rdi), %ymm11
	vmovdqu	0x180(%rdi), %ymm12
	vmovdqu	0x1a0(%rdi), %ymm13
	vmovdqu	0x1c0(%rdi), %ymm14
	vmovdqu	0x1e0(%rdi), %ymm15
	ret
3:	movdqu	0x000(%rdi), %xmm0
	movdqu	0x020(%rdi), %xmm1
	movdqu	0x040(%rdi), %xmm2
	movdqu	0x060(%rdi), %xmm3
	movdqu	0x080(%rdi), %xmm4
	movdqu	0x0a0(%rdi), %xmm5
	movdqu	0x0c0(%rdi), %xmm6
	movdqu	0x0e0(%rdi), %xmm7
	movdqu	0x100(%rdi), %xmm8
	movdqu	0x120(%rdi), %xmm9
	movdqu	0x140(%rdi), %xmm10
	movdqu	0x160(%rdi), %xmm11
	movdqu	0x180(%rdi), %xmm12
	movdqu	0x1a0(%rdi), %xmm13
	movdqu	0x1c0(%rdi), %xmm14
	movdqu	0x1e0(%rdi), %xmm15
	ret

/* ---------------------------------------------------------- syscall MSRs */
msr_init:
	mov	$MSR_EFER, %ecx
	rdmsr
	or	$1, %eax                   /* SCE */
	wrmsr
	mov	$MSR_STAR, %ecx
	movabs	$STAR_VALUE, %rax
	call	wrmsr_check
	mov	$MSR_LSTAR, %ecx
	lea	syscall_entry(%rip), %rax
	call	wrmsr_check
	mov	$MSR_SFMASK, %ecx
	mov	$SFMASK_VALUE, %rax
	call	wrmsr_check
	ret

/* write MSR ecx = rax, read it back, complain on mismatch; clobbers rdx r8 */
wrmsr_check:
	mov	%rax, %r8
	mov	%rax, %rdx
	shr	$32, %rdx
	wrmsr
	rdmsr
	shl	$32, %rdx
	or	%rdx, %rax
	cmp	%rax, %r8
	je	1f
	lea	str_err_msr(%rip), %rsi
	call	puts
1:	ret

/*
 * System calls: `int $0x80` from ring 3 (interrupt gate, DPL 3, IF=0,
 * kernel stack from TSS.RSP0).  The `syscall` instruction is NOT used:
 * under kvm_pvm it jumps to LSTAR but stays in ring 3 (CS 0x2b), and
 * sysretq #GPs.  STAR/LSTAR/SFMASK are still programmed, read back and
 * covered by the PING checksum.  eax = number:
 *   SYS_NOP   count only
 *   SYS_WAIT  sleep until line_ready (sti;hlt)
 *   SYS_DONE  clear line_ready, pull queued input from the UART
 *   SYS_RDMSR rax = MSR[edi]
 *   SYS_WRITE send rdx (< 256) bytes at rsi to the UART
 * Preserves everything except rax.
 */
isr_syscall:
	incq	syscall_count(%rip)
	push	%rcx
	push	%r11
	push	%rdx
	push	%rsi
	push	%rdi
	cmp	$SYS_WAIT, %eax
	je	2f
	cmp	$SYS_DONE, %eax
	je	4f
	cmp	$SYS_RDMSR, %eax
	je	5f
	cmp	$SYS_WRITE, %eax
	je	6f
	jmp	9f
2:	cmpb	$0, line_ready(%rip)
	jne	9f
	sti
	hlt                                /* sti shadow: no lost wakeup */
	cli
	jmp	2b
4:	movb	$0, line_ready(%rip)
	call	uart_drain
	jmp	9f
5:	mov	%edi, %ecx
	rdmsr
	shl	$32, %rdx
	or	%rdx, %rax
	jmp	9f
6:	cmp	$256, %rdx                 /* SYS_WRITE: rsi = buf, rdx = len */
	jae	9f
	call	kwrite
9:	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%r11
	pop	%rcx
	iretq

/* LSTAR target: never reached (see above) */
syscall_entry:
	ud2

/* TSS: RSP0 = kernel stack for interrupts taken in ring 3 */
tss_init:
	lea	tss(%rip), %rax
	lea	stack_top(%rip), %rdx
	mov	%rdx, 4(%rax)              /* RSP0 */
	movw	$104, 102(%rax)            /* no I/O bitmap */
	lea	gdt_tss(%rip), %rdi
	movw	$103, 0(%rdi)              /* limit */
	mov	%ax, 2(%rdi)               /* base 15:0 */
	mov	%rax, %rdx
	shr	$16, %rdx
	mov	%dl, 4(%rdi)               /* base 23:16 */
	movb	$0x89, 5(%rdi)             /* present, 64-bit TSS available */
	movb	$0, 6(%rdi)
	mov	%dh, 7(%rdi)               /* base 31:24 */
	shr	$16, %rdx
	mov	%edx, 8(%rdi)              /* base 63:32 */
	movl	$0, 12(%rdi)
	mov	$SEL_TSS, %ax
	ltr	%ax
	ret

/* ------------------------------------------------------------ pattern */
pattern_init:
	mov	$PATTERN_ADDR, %edi
	xor	%ecx, %ecx
	movabs	$0x0123456789abcdef, %rax
1:	mov	%rax, (%rdi,%rcx,8)
	rol	$7, %rax
	add	%rcx, %rax
	inc	%ecx
	cmp	$(PATTERN_SIZE / 8), %ecx
	jb	1b
	movq	$0, PRIV_ADDR
	ret

/* ---------------------------------------------------- interrupt setup */
/* set_gate: vector %edi -> handler %rsi (64-bit interrupt gate) */
set_gate:
	lea	idt(%rip), %rax
	shl	$4, %rdi
	add	%rdi, %rax
	mov	%si, 0(%rax)
	movw	$0x08, 2(%rax)
	movw	$0x8e00, 4(%rax)
	mov	%rsi, %rdx
	shr	$16, %rdx
	mov	%dx, 6(%rax)
	shr	$16, %rdx
	mov	%edx, 8(%rax)
	movl	$0, 12(%rax)
	ret

idt_init:
	/* 0..31: exception stubs, 32..255: spurious */
	xor	%r8d, %r8d
1:	mov	%r8d, %edi
	lea	exc_stubs(%rip), %rsi
	mov	%r8, %rax
	shl	$4, %rax
	add	%rax, %rsi
	cmp	$32, %r8d
	jb	2f
	lea	isr_spurious(%rip), %rsi
2:	call	set_gate
	inc	%r8d
	cmp	$256, %r8d
	jb	1b
	mov	$VEC_PIT, %edi
	lea	isr_pit(%rip), %rsi
	call	set_gate
	mov	$VEC_LAPIC_TMR, %edi
	lea	isr_lapic_timer(%rip), %rsi
	call	set_gate
	mov	$VEC_UART, %edi
	lea	isr_uart(%rip), %rsi
	call	set_gate
	mov	$VEC_SYSCALL, %edi
	lea	isr_syscall(%rip), %rsi
	call	set_gate
	movb	$0xee, 5(%rax)            /* DPL 3: callable from ring 3 */
	lidt	idt_ptr(%rip)
	ret

/* 8259 pair: vectors 0x20/0x28, only IRQ0 (PIT) unmasked */
pic_init:
	mov	$0x11, %al
	out	%al, $0x20                 /* ICW1: edge, cascade, ICW4 */
	out	%al, $0xa0
	mov	$0x20, %al
	out	%al, $0x21                 /* ICW2: vector base */
	mov	$0x28, %al
	out	%al, $0xa1
	mov	$0x04, %al
	out	%al, $0x21                 /* ICW3: slave on IRQ2 */
	mov	$0x02, %al
	out	%al, $0xa1
	mov	$0x01, %al
	out	%al, $0x21                 /* ICW4: 8086 mode */
	out	%al, $0xa1
	mov	$0xfe, %al
	out	%al, $0x21                 /* OCW1: mask all but IRQ0 */
	mov	$0xff, %al
	out	%al, $0xa1
	ret

/* IOAPIC: mask all 24 pins, then pin 4 (COM1) -> VEC_UART, edge, high,
   fixed, physical destination APIC 0 */
ioapic_init:
	mov	$IOAPIC_BASE, %esi
	xor	%ecx, %ecx
1:	lea	0x10(,%rcx,2), %eax
	movl	%eax, (%rsi)
	movl	$0x10000, 0x10(%rsi)       /* masked */
	inc	%eax
	movl	%eax, (%rsi)
	movl	$0, 0x10(%rsi)
	inc	%ecx
	cmp	$24, %ecx
	jb	1b
	movl	$0x18, (%rsi)              /* pin 4 low dword */
	movl	$VEC_UART, 0x10(%rsi)
	ret

/* LAPIC: software enable, LINT0 = ExtINT (PIC), LINT1 = NMI,
   timer periodic VEC_LAPIC_TMR, divide 16, 10 ms at 1 GHz bus */
lapic_init:
	mov	$LAPIC_BASE, %esi
	movl	$0, 0x80(%rsi)             /* TPR */
	movl	$(0x100 | VEC_SPURIOUS), 0xf0(%rsi)
	movl	$0x700, 0x350(%rsi)        /* LINT0 ExtINT */
	movl	$0x400, 0x360(%rsi)        /* LINT1 NMI */
	movl	$0x3, 0x3e0(%rsi)          /* divide by 16 */
	movl	$(0x20000 | VEC_LAPIC_TMR), 0x320(%rsi)
	movl	$625000, 0x380(%rsi)       /* initial count */
	ret

/* PIT channel 0, mode 2, ~100 Hz */
pit_init:
	mov	$0x34, %al
	out	%al, $0x43
	mov	$(11932 & 0xff), %al
	out	%al, $0x40
	mov	$(11932 >> 8), %al
	out	%al, $0x40
	ret

/* ------------------------------------------------- interrupt handlers */
isr_pit:
	push	%rax
	incq	pit_ticks(%rip)
	mov	$0x20, %al
	out	%al, $0x20                 /* PIC EOI */
	pop	%rax
	iretq

isr_lapic_timer:
	push	%rax
	incq	lapic_ticks(%rip)
	mov	$(LAPIC_BASE + 0xb0), %eax
	movl	$0, (%rax)                 /* LAPIC EOI */
	pop	%rax
	iretq

/*
 * uart_drain: move received bytes into line_buf until the RX FIFO is empty
 * or a complete line is waiting to be processed (line_ready): the rest then
 * stays in the FIFO and is picked up by the idle loop after the command,
 * so pipelined commands are not lost.  Called from the ISR and (with
 * interrupts off) from the idle loop.  Clobbers rax rcx rdx rsi rdi.
 */
uart_drain:
	mov	$64, %edi                  /* bounded */
1:	cmpb	$0, line_ready(%rip)
	jne	5f
	mov	$COM1 + 5, %dx
	in	%dx, %al
	test	$1, %al                    /* LSR.DR */
	jz	5f
	mov	$COM1, %dx
	in	%dx, %al
	cmp	$'\r', %al
	je	2f
	cmp	$'\n', %al
	je	2f
	movzbl	line_len(%rip), %ecx
	cmp	$62, %ecx
	jae	4f                         /* overlong line: truncate */
	lea	line_buf(%rip), %rsi
	mov	%al, (%rsi,%rcx)
	incb	line_len(%rip)
	jmp	4f
2:	movzbl	line_len(%rip), %ecx       /* end of line */
	test	%ecx, %ecx
	jz	4f
	lea	line_buf(%rip), %rsi
	lea	cmd_buf(%rip), %rdx
3:	mov	-1(%rsi,%rcx), %al
	mov	%al, -1(%rdx,%rcx)
	loop	3b
	movzbl	line_len(%rip), %ecx
	movb	$0, (%rdx,%rcx)
	movb	$0, line_len(%rip)
	movb	$1, line_ready(%rip)
4:	dec	%edi
	jnz	1b
5:	ret

isr_uart:
	push	%rax
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	call	uart_drain
	mov	$(LAPIC_BASE + 0xb0), %eax
	movl	$0, (%rax)                 /* LAPIC EOI */
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rax
	iretq

isr_spurious:
	iretq

/* exception stubs: push vector, report, halt forever */
	.balign	16
exc_stubs:
	.set	vec, 0
	.rept	32
	.balign	16
	pushq	$vec
	jmp	exc_common
	.set	vec, vec + 1
	.endr

exc_common:
	lea	str_exc(%rip), %rsi
	call	puts
	mov	0(%rsp), %rdi              /* vector */
	call	puthex
	mov	$' ', %al
	call	putc
	mov	8(%rsp), %rdi              /* error code or rip */
	call	puthex
	mov	$' ', %al
	call	putc
	mov	16(%rsp), %rdi             /* rip or cs */
	call	puthex
	call	newline
1:	cli
	hlt
	jmp	1b

/* ------------------------------------------------------------- data */
	.section .rodata
hexdigits:	.ascii	"0123456789abcdef"
str_ready:	.asciz	"READY\n"
str_info:	.asciz	"INFO xsave="
str_info_avx:	.asciz	" avx="
str_pong:	.asciz	"PONG "
str_result:	.asciz	"RESULT "
str_value:	.asciz	"VALUE "
str_ok:		.asciz	"OK\n"
str_err:	.asciz	"ERR\n"
str_stat_pit:	.asciz	"STAT pit="
str_stat_lapic:	.asciz	" lapic="
str_stat_tsc:	.asciz	" tsc="
str_exc:	.asciz	"EXC "
str_err_msr:	.asciz	"ERR msr\n"
str_err_syscall:.asciz	"ERR syscall\n"
str_cmd_ping:	.asciz	"PING"
str_cmd_comp:	.asciz	"COMP "
str_cmd_write:	.asciz	"WRITE "
str_cmd_read:	.asciz	"READ"
str_cmd_stat:	.asciz	"STAT"

	.data
	.balign	16
gdt:
	.quad	0
	.quad	0x00af9a000000ffff         /* 0x08: kernel 64-bit code */
	.quad	0x00cf92000000ffff         /* 0x10: kernel data */
	.quad	0x00cffa000000ffff         /* 0x18: user 32-bit code (sysret layout) */
	.quad	0x00cff2000000ffff         /* 0x20: user data */
	.quad	0x00affa000000ffff         /* 0x28: user 64-bit code */
gdt_tss:
	.quad	0, 0                       /* 0x30: TSS, filled by tss_init */
gdt_end:
	.balign	8
	.word	0, 0, 0
gdt_ptr:
	.word	gdt_end - gdt - 1
	.quad	gdt
	.balign	8
	.word	0, 0, 0
idt_ptr:
	.word	256 * 16 - 1
	.quad	idt

	.bss
	.balign	4096
idt:		.skip	256 * 16
vecsave:	.skip	512
tsc0:		.skip	8
pit_ticks:	.skip	8
lapic_ticks:	.skip	8
syscall_count:	.skip	8
out_len:	.skip	1
out_buf:	.skip	256
have_avx:	.skip	1
have_xsave:	.skip	1
line_ready:	.skip	1
line_len:	.skip	1
line_buf:	.skip	64
cmd_buf:	.skip	64
	.balign	16
tss:		.skip	104
	.balign	16
stack:		.skip	16384              /* ring 0: interrupts from ring 3 */
stack_top:
user_stack:	.skip	16384
user_stack_top:
