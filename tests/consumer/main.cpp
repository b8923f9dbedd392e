#include <anyio/anyio.hpp>

anyio::Task<int> amain() { co_return 42; }

int main() { return anyio::run(amain()) == 42 ? 0 : 1; }
