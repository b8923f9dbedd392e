// anyio-cpp: the umbrella header. Brings in the whole core (fmt formatters are opt-in:
// <anyio/fmt.hpp>).
#pragma once

#include "blocking_portal.hpp"
#include "cancel_scope.hpp"
#include "capacity_limiter.hpp"
#include "context.hpp"
#include "debug.hpp"
#include "errors.hpp"
#include "event.hpp"
#include "event_loop.hpp"
#include "file.hpp"
#include "from_thread.hpp"
#include "io.hpp"
#include "memory_stream.hpp"
#include "net.hpp"
#include "signals.hpp"
#include "sync.hpp"
#include "task.hpp"
#include "task_group.hpp"
#include "to_thread.hpp"
