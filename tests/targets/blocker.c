/* Test target for tests/test_inject.py: a multi-threaded process whose main thread (the thread group
 * leader) blocks in one syscall while a writer thread stores to memory in a loop and a helper thread
 * obeys commands from stdin.  Build: gcc -O1 -pthread -o blocker blocker.c
 *
 *   blocker MODE [--setuid UID] [--seccomp] [--ignore-trap] [--pages N]
 *   MODE: read | ppoll | futex | futex_timeout | nanosleep | epoll | vfork | idle | leader_exit
 *   (vfork: the leader waits 4 s for a vfork child, a sleep no ptrace stop can interrupt)
 *
 * Prints "READY pid=P anon=HEX shm=HEX pages=N", then, when the blocking call returns,
 * "RESULT ret=R errno=E ns=NS data=D mask_ok=M" (data: what read/ppoll read; mask_ok: the thread's
 * signal mask is the one it had before the call).  Commands (one reply line each):
 *   wake                   make the blocking call return (pipe write "hello" / futex wake); no reply
 *   write REGION P...      store to pages P of REGION (anon | shm)          -> OK
 *   kwrite REGION P        read(2) one page from a pipe into page P          -> OK n
 *   count                  the writer thread's loop counter                   -> COUNT n
 *   trap                   raise(SIGTRAP), caught by a handler                -> TRAPPED n
 *   exit                   exit(0)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/epoll.h>
#include <linux/filter.h>
#include <linux/futex.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static char *anon, *shm;
static long page, npages = 64;
static int wake_pipe[2];
static uint32_t futex_word;
static volatile uint64_t counter;
static volatile sig_atomic_t traps;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    va_list ap;
    pthread_mutex_lock(&out_lock);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
    pthread_mutex_unlock(&out_lock);
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void on_trap(int sig)
{
    (void)sig;
    traps++;
}

static void *writer(void *arg)
{
    static char scratch[1 << 16];
    (void)arg;
    for (;;) {
        scratch[counter % sizeof scratch] = (char)counter;
        counter++;
    }
    return NULL;
}

static char *region(const char *name)
{
    return strcmp(name, "anon") == 0 ? anon : strcmp(name, "shm") == 0 ? shm : NULL;
}

static void *helper(void *arg)
{
    char line[4096];
    (void)arg;
    while (fgets(line, sizeof line, stdin)) {
        char *save, *cmd = strtok_r(line, " \n", &save);
        if (!cmd)
            continue;
        if (strcmp(cmd, "wake") == 0) {
            __atomic_store_n(&futex_word, 1, __ATOMIC_SEQ_CST);
            syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
            if (write(wake_pipe[1], "hello", 5) != 5)
                die("write wake pipe");
        } else if (strcmp(cmd, "write") == 0 || strcmp(cmd, "kwrite") == 0) {
            char *base = region(strtok_r(NULL, " \n", &save));
            char *p;
            long n = 0;
            if (!base)
                die("bad region");
            while ((p = strtok_r(NULL, " \n", &save))) {
                char *at = base + atol(p) * page;
                if (cmd[0] == 'w') {
                    memset(at, 0x5a, 8);
                    continue;
                }
                static char kbuf[1 << 16];
                int kp[2];
                if (pipe(kp) < 0)
                    die("pipe");
                memset(kbuf, 'k', (size_t)page);
                if (write(kp[1], kbuf, (size_t)page) != page)
                    die("write kpipe");
                n = read(kp[0], at, (size_t)page);   /* the kernel writes into the page */
                close(kp[0]);
                close(kp[1]);
            }
            say(cmd[0] == 'w' ? "OK\n" : "OK %ld\n", n);
        } else if (strcmp(cmd, "count") == 0) {
            say("COUNT %llu\n", (unsigned long long)counter);
        } else if (strcmp(cmd, "trap") == 0) {
            raise(SIGTRAP);
            say("TRAPPED %d\n", (int)traps);
        } else if (strcmp(cmd, "exit") == 0) {
            exit(0);
        }
    }
    exit(0);
}

static void allow_all_seccomp(void)
{
    struct sock_filter insn[] = { BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW) };
    struct sock_fprog prog = { .len = 1, .filter = insn };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
        die("seccomp");
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "idle";
    char data[64] = "";
    sigset_t before, after;
    pthread_t t;
    long ret = 0;
    int err = 0, memfd;
    uint64_t t0;

    page = sysconf(_SC_PAGESIZE);
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--setuid") == 0 && i + 1 < argc) {
            if (setuid((uid_t)atoi(argv[++i])) < 0)
                die("setuid");
        } else if (strcmp(argv[i], "--seccomp") == 0) {
            allow_all_seccomp();
        } else if (strcmp(argv[i], "--ignore-trap") == 0) {
            signal(SIGTRAP, SIG_IGN);
        } else if (strcmp(argv[i], "--pages") == 0 && i + 1 < argc) {
            npages = atol(argv[++i]);
        }
    }
    if (signal(SIGTRAP, SIG_IGN) != SIG_IGN)
        signal(SIGTRAP, on_trap);
    anon = mmap(NULL, (size_t)(npages * page), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memfd = memfd_create("blocker-shm", MFD_CLOEXEC);
    if (anon == MAP_FAILED || memfd < 0 || ftruncate(memfd, npages * page) < 0)
        die("memory");
    shm = mmap(NULL, (size_t)(npages * page), PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (shm == MAP_FAILED || pipe(wake_pipe) < 0)
        die("memory");
    if (pthread_create(&t, NULL, writer, NULL) || pthread_create(&t, NULL, helper, NULL))
        die("pthread_create");
    say("READY pid=%d anon=%lx shm=%lx pages=%ld\n", getpid(), (unsigned long)anon,
        (unsigned long)shm, npages);
    if (strcmp(mode, "leader_exit") == 0)
        pthread_exit(NULL);

    /* the kernel fills only its 8 bytes of glibc's 128-byte sigset_t, and glibc 2.36's
     * sigemptyset clears only those too: the rest is stack garbage unless zeroed here, and the
     * memcmp below compares all of it (it failed every run on a machine whose stack differed) */
    memset(&before, 0, sizeof before);
    memset(&after, 0, sizeof after);
    pthread_sigmask(SIG_SETMASK, NULL, &before);
    t0 = now_ns();
    if (strcmp(mode, "read") == 0) {
        ret = read(wake_pipe[0], data, sizeof data - 1);
    } else if (strcmp(mode, "ppoll") == 0) {
        struct pollfd pfd = { .fd = wake_pipe[0], .events = POLLIN };
        struct timespec ts = { 30, 0 };
        sigset_t during;
        sigemptyset(&during);
        sigaddset(&during, SIGUSR1);              /* a different mask while in ppoll */
        ret = ppoll(&pfd, 1, &ts, &during);
        err = errno;
        if (ret == 1 && read(wake_pipe[0], data, sizeof data - 1) < 0)
            die("read after ppoll");
    } else if (strcmp(mode, "futex") == 0 || strcmp(mode, "futex_timeout") == 0) {
        struct timespec ts = { 30, 0 };
        ret = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0,
                      mode[5] ? &ts : NULL, NULL, 0);
    } else if (strcmp(mode, "nanosleep") == 0) {
        struct timespec ts = { 3, 0 }, rem;
        ret = syscall(SYS_nanosleep, &ts, &rem);
    } else if (strcmp(mode, "epoll") == 0) {    /* a stop makes epoll_wait fail with EINTR */
        struct epoll_event ev = { .events = EPOLLIN }, got;
        int ep = epoll_create1(0);
        if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, wake_pipe[0], &ev) < 0)
            die("epoll");
        ret = epoll_wait(ep, &got, 1, 30000);
        err = errno;
        if (ret == 1 && read(wake_pipe[0], data, sizeof data - 1) < 0)
            die("read after epoll_wait");
    } else if (strcmp(mode, "vfork") == 0) {
        ret = vfork();
        if (ret == 0) {
            struct timespec ts = { 4, 0 };
            syscall(SYS_nanosleep, &ts, NULL);
            _exit(0);
        }
        ret = ret > 0 ? 0 : ret;
    } else {
        for (;;)
            pause();
    }
    if (ret < 0)
        err = errno;
    pthread_sigmask(SIG_SETMASK, NULL, &after);
    say("RESULT ret=%ld errno=%d ns=%llu data=%s mask_ok=%d\n", ret, err,
        (unsigned long long)(now_ns() - t0), data[0] ? data : "-",
        memcmp(&before, &after, sizeof before) == 0);
    for (;;)
        pause();
}
