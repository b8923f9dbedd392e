// main() for the tests when building against Catch2 v2 (v3 links Catch2::Catch2WithMain).
// Compiled once, as an object library shared by every test executable.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
