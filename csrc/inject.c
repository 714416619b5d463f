/* userfaultfd injection into a non-cooperating process (x86-64).  See inject.h for the contract.
 *
 * Caller: clone(CLONE_VM|CLONE_VFORK|CLONE_FILES) of the injector on a stack of its own, with
 * every signal blocked; once it has exited, read the report it left in the caller's memory.
 * Injector: a separate process (its own session, so it outlives the caller) sharing the caller's
 * memory and fd table; raw system calls only, no malloc or stdio. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
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

struct injector_args {          /* the caller's, on its stack; the injector shares the memory */
    int pid, tid;
    uint64_t ip, hold_ns;
    struct mg_inject_result res;
    int done;                   /* set last: the injector reported */
};

/* The injector (a clone sharing our memory and fd table, on its own stack).  Every signal is
 * blocked already (inherited from the caller) but SIGALRM, unblocked here with a handler that
 * does nothing: wait_stop's timer.  Raw system calls only (its errno is the caller's thread's,
 * which is suspended until the injector exits: CLONE_VFORK). */
static int injector(void *arg)
{
    struct injector_args *a = arg;
    struct mg_inject_result res = { .target_fd = -1, .fd = -1, .injector_pid = (int32_t)syscall(SYS_getpid) };
    struct sigaction sa = { .sa_handler = on_alarm };   /* no SA_RESTART: wait4 returns EINTR */
    sigset_t alrm;

    sigemptyset(&alrm);
    sigaddset(&alrm, SIGALRM);
    /* setsid: out of the caller's process group and session, so a kill of those misses us */
    if (SYS(SYS_setsid) < 0 || sigaction(SIGALRM, &sa, NULL) < 0 || sigprocmask(SIG_UNBLOCK, &alrm, NULL) < 0)
        fail(&res, MG_INJ_SPAWN, -errno);
    else
        injector_run(a->pid, a->tid, a->ip, a->hold_ns, &res);
    a->res = res;
    __atomic_store_n(&a->done, 1, __ATOMIC_RELEASE);
    return 0;
}

#define INJECTOR_STACK (256 * 1024)

int mg_inject_uffd(int pid, int tid, uint64_t syscall_ip, uint64_t hold_ns, struct mg_inject_result *res)
{
    struct injector_args a = { .pid = pid, .tid = tid, .ip = syscall_ip, .hold_ns = hold_ns };
    sigset_t all, old;
    int st, err;
    long child = -1;
    void *stack;

    memset(res, 0, sizeof *res);
    res->target_fd = res->fd = -1;
    stack = mmap(NULL, INJECTOR_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED)
        return fail(res, MG_INJ_SPAWN, -errno);
    sigfillset(&all);
    /* the injector starts with every signal blocked: no window in which one could kill it */
    if ((err = pthread_sigmask(SIG_SETMASK, &all, &old)) == 0) {
        /* posix_spawn's way: the injector shares our memory (no page tables copied, however
         * large this process is) and our fd table (pidfd_getfd's copy lands here); we resume
         * when it has exited.  If we die meanwhile, it holds the memory and finishes. */
        child = clone(injector, (char *)stack + INJECTOR_STACK,
                      CLONE_VM | CLONE_VFORK | CLONE_FILES | SIGCHLD, &a);
        err = child < 0 ? errno : 0;
        pthread_sigmask(SIG_SETMASK, &old, NULL);    /* cannot fail: valid how and set */
    }
    if (err) {
        munmap(stack, INJECTOR_STACK);
        return fail(res, MG_INJ_SPAWN, -err);
    }
    while (waitpid((pid_t)child, &st, 0) < 0 && errno == EINTR)   /* ECHILD: reaped elsewhere */
        ;
    munmap(stack, INJECTOR_STACK);
    if (!__atomic_load_n(&a.done, __ATOMIC_ACQUIRE)) {
        res->injector_pid = (int32_t)child;
        return fail(res, MG_INJ_INJECTOR_DIED, -ECHILD);
    }
    *res = a.res;
    return res->stage ? -res->error : 0;
}
