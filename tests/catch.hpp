// Catch2 shim: tests include "catch.hpp" and get Catch2 v3 or v2, whichever the build found.
// tests/CMakeLists.txt defines ANYIO_CATCH3 or ANYIO_CATCH2 to say which; without either
// (e.g. a tool parsing one file) the header that exists is used.
#pragma once

#if defined(ANYIO_CATCH3)
#include <catch2/catch_all.hpp>
#elif defined(ANYIO_CATCH2)
#include <catch2/catch.hpp>
#elif __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_all.hpp>  // Catch2 v3 (main() comes from Catch2::Catch2WithMain)
#else
#include <catch2/catch.hpp>  // Catch2 v2 (main() comes from tests/catch_main.cpp)
#endif
