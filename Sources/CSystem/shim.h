#pragma once
// C library interfaces the Glibc module does not carry.
#if defined(__linux__)
#include <malloc.h>
#endif
