#pragma once
// C library interfaces the Glibc module does not carry.
#if defined(__linux__)
#include <malloc.h>
#include <sys/syscall.h>
#include <unistd.h>

/// fallocate(2) with mode 0: allocates `length` bytes of disk blocks for `fd` from offset 0 and
/// sets the file size to at least `length`. Returns 0, or -1 with errno set (EOPNOTSUPP where
/// the file system cannot, ENOSPC when the disk is full). Glibc declares fallocate only under
/// _GNU_SOURCE, hence the system call.
static inline int mergekit_preallocate(int fd, long long length) {
  return (int)syscall(SYS_fallocate, fd, 0, (long long)0, length);
}
#endif
