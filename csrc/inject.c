/* userfaultfd injection into a non-cooperating process (x86-64).  See inject.h for the contract.
 *
 * Caller: pipe, clone(CLONE_FILES|SIGCHLD) with every signal blocked, wait for the child, read its
 * report.  Child (the injector, a forked copy of the caller sharing its fd table): raw syscalls
 * only, no malloc or stdio; it never returns, it writes its report and exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "inject.h"

#define NR_PIDFD_OPEN 434
#define NR_PIDFD_GETFD 438
#define PIDFD_THREAD O_EXCL
#define UFFD_USER_MODE_ONLY 1
/* the kernel's restart codes, in rax of a thread stopped on its way out of an interrupted syscall */
enum { ERESTARTSYS = 512, ERESTARTNOINTR = 513, ERESTARTNOHAND = 514, ERESTART_RESTARTBLOCK = 516 };
#define SIGBIT(s) (1ull << ((s) - 1))
/* The thread's mask while injecting: everything, except the signals the kernel forces on a fault
 * or a single-step.  Forcing a signal that is blocked (or ignored) resets its handler to SIG_DFL
 * for good, so blocking these would damage the target's SIGTRAP/SIGSEGV/... handlers. */
#define INJECT_MASK (~(SIGBIT(SIGTRAP) | SIGBIT(SIGSEGV) | SIGBIT(SIGBUS) | SIGBIT(SIGILL) | \
                       SIGBIT(SIGFPE) | SIGBIT(SIGSYS)))

struct injector {               /* the child's whole state, on its stack */
    int tid;
    uint64_t ip;
    struct user_regs_struct saved;
    uint64_t window_start;      /* ns, 0 until the first SETREGS of injection registers */
    int kept_sig;               /* a signal sent to the thread during a step: delivered at detach */
};

static long sys_ret(long r) { return r < 0 ? -errno : r; }
#define SYS(...) sys_ret(syscall(__VA_ARGS__))

static long pt(long req, int tid, long addr, const void *data) { return SYS(SYS_ptrace, req, tid, addr, data); }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);       /* vDSO, async-signal-safe */
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = { (time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull) };
    while (SYS(SYS_nanosleep, &ts, &ts) == -EINTR)   /* the rest of it, after a SIGALRM */
        ;
}

static void on_alarm(int sig) { (void)sig; }   /* only to interrupt a blocking wait4 */

/* The next stop of tid: the wait status (> 0), -ESRCH if it exited, -ETIMEDOUT.  A blocking wait,
 * bounded by an interval timer whose SIGALRM interrupts it (it keeps firing every 10 ms after the
 * deadline, so one that comes just before wait4 blocks is no race): a thread that never stops
 * (uninterruptible sleep, a vfork parent) cannot hang us. */
static int wait_stop(int tid)
{
    uint64_t deadline = now_ns() + MG_INJ_STOP_TIMEOUT_NS;
    struct itimerval on = { { 0, 10000 }, { MG_INJ_STOP_TIMEOUT_NS / 1000000000ull,
                                            MG_INJ_STOP_TIMEOUT_NS % 1000000000ull / 1000 } };
    struct itimerval off = { { 0, 0 }, { 0, 0 } };
    long r;
    int st = 0;

    if ((r = SYS(SYS_setitimer, ITIMER_REAL, &on, NULL)) < 0)
        return (int)r;
    while ((r = SYS(SYS_wait4, tid, &st, __WALL, NULL)) == -EINTR && now_ns() < deadline)
        ;
    syscall(SYS_setitimer, ITIMER_REAL, &off, NULL);
    if (r > 0)
        return WIFSTOPPED(st) ? st : -ESRCH;
    return r == -EINTR ? -ETIMEDOUT : r == -ECHILD ? -ESRCH : (int)r;
}

/* Have the stopped thread execute syscall nr(a0) at s->ip.  0 with *ret = the syscall's return
 * value, or -errno: -ESRCH (thread gone), -EFAULT (what is at ip faulted or was no syscall). */
static int inject_call(struct injector *s, long nr, long a0, long *ret)
{
    struct user_regs_struct r = s->saved;
    siginfo_t si;
    long e;

    r.rip = s->ip;
    r.rax = nr;
    r.orig_rax = -1;            /* not in a syscall: no restart handling of our own registers */
    r.rdi = a0;
    if ((e = pt(PTRACE_SETREGS, s->tid, 0, &r)) < 0)
        return e;
    if (!s->window_start)
        s->window_start = now_ns();
    for (int i = 0; i < 8; i++) {
        if ((e = pt(PTRACE_SINGLESTEP, s->tid, 0, 0)) < 0)
            return e;
        int st = wait_stop(s->tid);
        if (st < 0)
            return st;
        if (st >> 16)           /* a group stop: stepping goes on; the kernel stops it again at detach */
            continue;
        if ((e = pt(PTRACE_GETSIGINFO, s->tid, 0, &si)) < 0)
            return e;
        if (si.si_code <= 0) {  /* sent by a process (kill, tgkill, sigqueue): deliver it at detach */
            if (!s->kept_sig)
                s->kept_sig = WSTOPSIG(st);
            continue;
        }
        if (WSTOPSIG(st) != SIGTRAP)
            return -EFAULT;     /* a fault at ip; the signal is dropped (we resume with 0) */
        if ((e = pt(PTRACE_GETREGS, s->tid, 0, &r)) < 0)
            return e;
        if (r.rip != s->ip + 2)
            return -EFAULT;
        *ret = (long)r.rax;
        return 0;
    }
    return -EAGAIN;
}

/* The saved registers as the thread must resume: a syscall the stop interrupted is restarted
 * here, as the kernel would have done on its way to user mode had no stop come. */
static int apply_restart(struct user_regs_struct *r)
{
    if ((long)r->orig_rax < 0)
        return 0;
    switch ((long)r->rax) {
    case -ERESTARTSYS: case -ERESTARTNOINTR: case -ERESTARTNOHAND:
        r->rax = r->orig_rax;
        break;
    case -ERESTART_RESTARTBLOCK:
        r->rax = __NR_restart_syscall;
        break;
    default:
        return 0;
    }
    r->rip -= 2;
    /* We resume the thread from the single-step SIGTRAP stop, inside get_signal(); the kernel then
     * runs its own restart switch on these registers.  rax is now a syscall number, never an
     * -ERESTART* code, so keeping orig_rax would not restart twice (checked: both pass the tests);
     * -1 says plainly that the thread is no longer in a syscall, so neither that switch nor the
     * restart logic of a signal handler delivered at detach reinterprets rax. */
    r->orig_rax = -1;
    return 1;
}

static int fail(struct mg_inject_result *res, int stage, long err)
{
    if (!res->stage) {          /* the first failure is the one reported */
        res->stage = stage;
        res->error = (int32_t)-err;
    }
    return (int)err;
}

static void injector_run(int pid, int tid, uint64_t ip, uint64_t hold_ns, struct mg_inject_result *res)
{
    struct injector s = { .tid = tid, .ip = ip };
    struct user_regs_struct restore;
    uint64_t mask = 0, block = INJECT_MASK, t0, t1;
    long e, ret = -1;
    int pidfd, gone = 0;

    /* a thread's pidfd reaches that thread's fd table even if the leader is a zombie (6.9+) */
    pidfd = (int)SYS(NR_PIDFD_OPEN, tid, tid == pid ? 0 : PIDFD_THREAD);
    if (pidfd < 0) {
        fail(res, MG_INJ_PIDFD, pidfd);     /* ESRCH: no such process or thread */
        return;
    }
#define TRY(stage, call, label) if ((e = (call)) < 0) { fail(res, stage, e); goto label; }
    t0 = now_ns();
    TRY(MG_INJ_SEIZE, pt(PTRACE_SEIZE, tid, 0, 0), out);
    /* from here until it stops, our exit (even by SIGKILL) would detach it untouched */
    t1 = now_ns();
    TRY(MG_INJ_INTERRUPT, pt(PTRACE_INTERRUPT, tid, 0, 0), out);
    for (int i = 0;; i++) {
        TRY(MG_INJ_STOP, i == 16 ? -EAGAIN : wait_stop(tid), out);
        if (e >> 16 == PTRACE_EVENT_STOP)
            break;
        /* a signal-delivery-stop came first: pass the signal on, wait again */
        TRY(MG_INJ_STOP, pt(PTRACE_CONT, tid, 0, (void *)(long)WSTOPSIG(e)), out);
    }
    res->ns_stop_wait = now_ns() - t1;
    TRY(MG_INJ_SAVE, pt(PTRACE_GETREGS, tid, 0, &s.saved), detach);
    TRY(MG_INJ_SAVE, pt(PTRACE_GETSIGMASK, tid, sizeof mask, &mask), detach);
    restore = s.saved;
    res->restarted = apply_restart(&restore);
    TRY(MG_INJ_SAVE, pt(PTRACE_SETSIGMASK, tid, sizeof block, &block), detach);

    /* the window: injection registers in the thread */
    e = inject_call(&s, __NR_userfaultfd, O_CLOEXEC | O_NONBLOCK, &ret);
    if (e == 0 && ret == -EPERM) {
        res->user_mode_only = 1;
        e = inject_call(&s, __NR_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY, &ret);
    }
    TRY(MG_INJ_USERFAULTFD, e < 0 ? e : ret, restore);
    res->target_fd = (int32_t)ret;
    if ((e = SYS(NR_PIDFD_GETFD, pidfd, res->target_fd, 0)) < 0)
        fail(res, MG_INJ_GETFD, e);     /* and go on: the target's copy must be closed */
    res->fd = (int32_t)e;
    if (hold_ns)
        sleep_ns(hold_ns);
    e = inject_call(&s, __NR_close, res->target_fd, &ret);
    if (e < 0 || ret < 0)
        fail(res, MG_INJ_CLOSE, e < 0 ? e : ret);

restore:
    gone = res->error == ESRCH;
    if (!gone && (e = pt(PTRACE_SETREGS, tid, 0, &restore)) < 0)
        gone = fail(res, MG_INJ_RESTORE, e) == -ESRCH;
    if (s.window_start)
        res->ns_window = now_ns() - s.window_start;
    if (!gone && (e = pt(PTRACE_SETSIGMASK, tid, sizeof mask, &mask)) < 0)
        gone = fail(res, MG_INJ_RESTORE, e) == -ESRCH;
detach:
    if (!gone && (e = pt(PTRACE_DETACH, tid, 0, (void *)(long)s.kept_sig)) < 0)
        fail(res, MG_INJ_DETACH, e);
    res->signal_kept = s.kept_sig;
    res->ns_total = now_ns() - t0;
out:
    if (res->stage && res->fd >= 0)
        syscall(SYS_close, res->fd);
    if (res->stage)
        res->fd = -1;
    syscall(SYS_close, pidfd);
}

/* The child: never returns.  Every signal is blocked already (inherited from the caller's clone)
 * but SIGALRM, unblocked here with a handler that does nothing: wait_stop's timer. */
static void injector(int pid, int tid, uint64_t ip, uint64_t hold_ns, int report_fd)
{
    struct mg_inject_result res = { .target_fd = -1, .fd = -1, .injector_pid = (int32_t)syscall(SYS_getpid) };
    struct sigaction sa = { .sa_handler = on_alarm };   /* no SA_RESTART: wait4 returns EINTR */
    sigset_t alrm;

    sigemptyset(&alrm);
    sigaddset(&alrm, SIGALRM);
    /* setsid: out of the caller's process group and session, so a kill of those misses us */
    if (SYS(SYS_setsid) < 0 || sigaction(SIGALRM, &sa, NULL) < 0 || sigprocmask(SIG_UNBLOCK, &alrm, NULL) < 0)
        fail(&res, MG_INJ_SPAWN, -errno);
    else
        injector_run(pid, tid, ip, hold_ns, &res);
    /* < PIPE_BUF into an empty pipe: written whole.  If not, the caller reports us as died. */
    syscall(SYS_write, report_fd, &res, sizeof res);
    syscall(SYS_exit_group, 0);
}

int mg_inject_uffd(int pid, int tid, uint64_t syscall_ip, uint64_t hold_ns, struct mg_inject_result *res)
{
    sigset_t all, old;
    int p[2], st, err;
    long child = -1;
    ssize_t n;

    memset(res, 0, sizeof *res);
    res->target_fd = res->fd = -1;
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
        return fail(res, MG_INJ_SPAWN, -errno);
    sigfillset(&all);
    /* the child starts with every signal blocked: no window in which one could kill it */
    if ((err = pthread_sigmask(SIG_SETMASK, &all, &old)) == 0) {
        /* fork semantics (no CLONE_VM, no new stack), but sharing our fd table */
        child = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, NULL, NULL, 0);
        err = child < 0 ? errno : 0;
        if (child == 0)
            injector(pid, tid, syscall_ip, hold_ns, p[1]);
        pthread_sigmask(SIG_SETMASK, &old, NULL);    /* cannot fail: valid how and set */
    }
    if (err) {
        close(p[0]);
        close(p[1]);
        return fail(res, MG_INJ_SPAWN, -err);
    }
    /* The pipe's write end stays open in the shared table, so EOF cannot tell us the child died:
     * wait for its exit, then read what it wrote (ECHILD: someone else reaped it; read anyway). */
    while (waitpid((pid_t)child, &st, 0) < 0 && errno == EINTR)
        ;
    n = read(p[0], res, sizeof *res);
    close(p[0]);
    close(p[1]);
    if (n != (ssize_t)sizeof *res) {
        memset(res, 0, sizeof *res);
        res->target_fd = res->fd = -1;
        res->injector_pid = (int32_t)child;
        return fail(res, MG_INJ_INJECTOR_DIED, -ECHILD);
    }
    return res->stage ? -res->error : 0;
}
