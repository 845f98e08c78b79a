#pragma once
#include <cblas.h>

// OpenBLAS's own (not in its cblas.h): stops the worker threads it started when it loaded; the
// next threaded BLAS call starts them again.
void blas_thread_shutdown_(void);
