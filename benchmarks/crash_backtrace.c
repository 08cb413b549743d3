/* Preloaded (LD_PRELOAD) into the GPU machine's test processes by benchmarks/gpu_check.sh: on a
 * fatal signal, writes the native frames (library, offset in it, exported symbol) to stderr, then
 * lets the signal take its course. That machine has no gdb, and Python's faulthandler names only
 * Python frames: a crash inside fastap's extension then said where in Python it was, not where in
 * C++ (2026-12-04: three segmentation faults cost a device call of their own to locate).
 *
 * Installed when the library is loaded, so faulthandler (pytest enables it) installs its handler
 * after this one, and calls this one once it has written the Python frames (it restores the
 * handler it found, then raises the signal again). Only what a signal handler may call, except
 * backtrace() and dladdr(), the usual last resort of a crashing process. Build:
 *   gcc -O1 -shared -fPIC -o crash_backtrace.so benchmarks/crash_backtrace.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void write_text(const char* text, int length) {
  if (length > 0) (void)!write(STDERR_FILENO, text, (size_t)length);
}

static void on_fatal_signal(int signal_number, siginfo_t* info, void* context) {
  (void)context;
  char line[600];
  void* frames[64];
  const int count = backtrace(frames, 64);
  int length = snprintf(line, sizeof line, "crash_backtrace: signal %d at address %p, %d frames\n",
                        signal_number, info->si_addr, count);
  write_text(line, length < (int)sizeof line ? length : (int)sizeof line - 1);
  for (int i = 0; i < count; ++i) {
    Dl_info where;
    memset(&where, 0, sizeof where);
    if (dladdr(frames[i], &where) && where.dli_fname) {
      length = snprintf(line, sizeof line, "crash_backtrace: #%d %s +0x%lx %s\n", i,
                        where.dli_fname,
                        (unsigned long)((char*)frames[i] - (char*)where.dli_fbase),
                        where.dli_sname ? where.dli_sname : "?");
    } else {
      length = snprintf(line, sizeof line, "crash_backtrace: #%d %p\n", i, frames[i]);
    }
    write_text(line, length < (int)sizeof line ? length : (int)sizeof line - 1);
  }
  /* The default action (a core, the exit status of the signal), as if this had not been here. */
  signal(signal_number, SIG_DFL);
  raise(signal_number);
}

__attribute__((constructor)) static void install(void) {
  static char alternate_stack[1 << 16];  /* (a stack overflow leaves no stack to run on) */
  stack_t stack;
  memset(&stack, 0, sizeof stack);
  stack.ss_sp = alternate_stack;
  stack.ss_size = sizeof alternate_stack;
  sigaltstack(&stack, NULL);
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = on_fatal_signal;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  const int fatal[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
  for (unsigned i = 0; i < sizeof fatal / sizeof fatal[0]; ++i) sigaction(fatal[i], &action, NULL);
}
