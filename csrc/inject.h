/*
 * Injecting a userfaultfd into a process that does not cooperate (x86-64): one of its threads is
 * stopped with ptrace, made to execute userfaultfd(2) at a `0f 05` of its own executable memory,
 * the new fd is copied out with pidfd_getfd, the target's copy is closed by an injected close(2),
 * and the thread's registers and signal mask are restored exactly.
 *
 * The tracer is a short-lived child of the caller (clone(CLONE_VM|CLONE_VFORK|CLONE_FILES), as
 * posix_spawn does: it shares the caller's memory, so starting it copies no page tables however
 * large the caller is, and the caller's fd table, so the copied fd lands there), in its own session, with every signal blocked (SIGALRM
 * excepted: a no-op handler, its own wait timeout), and with no ptrace option that would kill the
 * target: if the caller dies mid-injection, even by SIGKILL, the child still restores the target
 * and detaches.  Conventions as track.h: 0 or -errno, no global state.
 *
 * The thread's signal mask while it holds the injection registers blocks everything but the
 * signals the kernel forces (SIGTRAP of the single-step, SIGSEGV/SIGBUS/SIGILL/SIGFPE/SIGSYS of a
 * fault): forcing a blocked signal would reset the target's handler for it to SIG_DFL.  A signal
 * sent to the thread meanwhile is kept and delivered at detach.
 */
#ifndef MIGRATOR_INJECT_H
#define MIGRATOR_INJECT_H
#include <stdint.h>

/* stage: the step that failed */
#define MG_INJ_OK            0
#define MG_INJ_SPAWN         1   /* caller: the injector's stack / clone */
#define MG_INJ_PIDFD         2   /* pidfd_open of the target */
#define MG_INJ_SEIZE         3   /* PTRACE_SEIZE (EPERM: no ptrace rights, or traced already) */
#define MG_INJ_INTERRUPT     4   /* PTRACE_INTERRUPT */
#define MG_INJ_STOP          5   /* waiting for the thread to stop (ETIMEDOUT: it never did) */
#define MG_INJ_SAVE          6   /* PTRACE_GETREGS / GETSIGMASK / SETSIGMASK */
#define MG_INJ_USERFAULTFD   7   /* the injected userfaultfd(2): its own errno, or EFAULT if
                                    syscall_ip did not execute as a syscall instruction */
#define MG_INJ_GETFD         8   /* pidfd_getfd */
#define MG_INJ_CLOSE         9   /* the injected close(2) of the target's copy */
#define MG_INJ_RESTORE      10   /* PTRACE_SETREGS / SETSIGMASK of the saved state */
#define MG_INJ_DETACH       11   /* PTRACE_DETACH */
#define MG_INJ_INJECTOR_DIED 12  /* the injector child died without reporting (killed) */

#define MG_INJ_STOP_TIMEOUT_NS 3000000000ull   /* longest wait for any one ptrace stop; past it
                                                  the injector exits, which detaches untouched */

struct mg_inject_result {
    int32_t target_fd;       /* the uffd's number inside the target (closed there again before detach), -1 if none */
    int32_t fd;              /* our copy of it (pidfd_getfd), in the CALLER's fd table, O_CLOEXEC; -1 on failure */
    int32_t user_mode_only;  /* 1 if userfaultfd needed UFFD_USER_MODE_ONLY (non-root target, vm.unprivileged_userfaultfd=0) */
    int32_t stage;           /* on failure: which step failed (MG_INJ_*) */
    int32_t error;           /* on failure: the errno of that step */
    int32_t injector_pid;    /* the tracer child's pid */
    int32_t signal_kept;     /* a signal that stopped the thread during a step and was delivered at detach, or 0 */
    int32_t restarted;       /* 1 if the saved registers were inside an interrupted syscall that restarts */
    uint64_t ns_total;       /* seize .. detach */
    uint64_t ns_stop_wait;   /* PTRACE_INTERRUPT .. the thread stopped */
    uint64_t ns_window;      /* first SETREGS of injection registers .. original registers restored */
};

/* Inject userfaultfd(O_CLOEXEC|O_NONBLOCK[|UFFD_USER_MODE_ONLY]) into thread tid of process pid, executed at
 * syscall_ip (the address of a `0f 05` instruction in the target's executable memory), take the new fd with
 * pidfd_getfd, close the target's copy by an injected close(2), restore the thread exactly, detach.
 * hold_ns: tests only, sleep that long inside the window (target holding injection registers). Returns 0 or -errno.
 *
 * The fd is taken through a pidfd of pid when tid == pid, else of the thread (PIDFD_THREAD, Linux
 * 6.9+), whose fd table it is: a zombie leader (after pthread_exit) has none.  A syscall the thread
 * was stopped in is restarted on resume (-ERESTART* codes), as if no stop had come.
 *
 * What is left of the window: if the injector child itself is SIGKILLed between the first SETREGS and
 * the restore (a few µs, or hold_ns), the thread resumes with the injection registers.  The caller
 * then gets stage MG_INJ_INJECTOR_DIED. */
int mg_inject_uffd(int pid, int tid, uint64_t syscall_ip, uint64_t hold_ns, struct mg_inject_result *res);

#endif
