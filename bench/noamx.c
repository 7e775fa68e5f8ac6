/*
 * noamx COMMAND [ARG]...: run COMMAND with AMX refused, to measure what a CPU without AMX runs.
 *
 * Linux grants a process the AMX tile state only when it asks with
 * arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); onnxruntime's MLAS asks once and, when
 * refused, uses its AVX-512-VNNI integer kernels instead. This launcher installs a seccomp
 * filter that fails exactly that request with EPERM (everything else is allowed), then execs
 * COMMAND, which inherits the filter. Used by bench/accuracy.py for its "VNNI only" column.
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: noamx COMMAND [ARG]...\n");
        return 2;
    }
    struct sock_filter filter[] = {
        /* Not x86-64: allow (the request does not exist there). */
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        /* arch_prctl(ARCH_REQ_XCOMP_PERM, ...): EPERM; any other call: allow. */
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_arch_prctl, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH_REQ_XCOMP_PERM, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog program = {sizeof(filter) / sizeof(filter[0]), filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0) {
        perror("noamx: cannot install the seccomp filter");
        return 1;
    }
    execvp(argv[1], argv + 1);
    perror("noamx: cannot run the command");
    return 127;
}
