// The root of every task the loop runs (the main task, task group children, from_thread and
// portal tasks): the task's bookkeeping and the owner of its body frame, in one allocation.
#pragma once

#include <coroutine>
#include <cstring>
#include <exception>
#include <new>
#include <string_view>
#include <utility>

#include "../errors.hpp"
#include "task_state.hpp"

namespace anyio::detail {

/// A task: its TaskState, and the Continuation of its body (the Task coroutine it runs), whose
/// frame it owns. Not itself a coroutine, so a task costs its body's frames plus this block
/// (and, for a task given a name, the name's bytes at the end of the same block).
/// Allocated by EventLoop::spawn (create); freed by finish_root when the body ends, or by
/// destroy_task_frames at loop shutdown.
struct RootTask final : TaskState, Continuation {
    /// A new root for `body`, a Task frame not started yet, with room after it for a copy of
    /// `given_name` (if not empty), which then becomes the task's name. Throws std::bad_alloc
    /// after destroying `body`'s frame (as the Task it came from would have), so that nothing
    /// is started and nothing leaks.
    template <class Promise>
    static RootTask* create(std::coroutine_handle<Promise> body, std::string_view given_name) {
        const std::size_t extra = given_name.empty() ? 0 : given_name.size() + 1;
        void* block = nullptr;
        try {
            block = ::operator new(sizeof(RootTask) + extra);
        } catch (...) {
            body.destroy();
            throw;
        }
        auto* root = ::new (block) RootTask(body);
        if (extra != 0) {
            char* name = reinterpret_cast<char*>(root + 1);
            std::memcpy(name, given_name.data(), given_name.size());
            name[given_name.size()] = '\0';
            root->name_.store(name, std::memory_order_relaxed);  // relaxed: see TaskState
        }
        return root;
    }
    // The block may be longer than the object (the name): always freed whole, unsized.
    static void operator delete(void* block) noexcept { ::operator delete(block); }

private:
    /// Takes over `body` (its promise is a FrameLink).
    template <class Promise>
    explicit RootTask(std::coroutine_handle<Promise> body) noexcept {
        FrameLink& link = body.promise();
        awaited_ = body;
        awaited_link_ = &link;
        link.awaited_by_ = this;  // resume_ stays empty: the body's end finishes the task
        resume_point_ = body;
    }
};

/// Called by the body's final suspend (`root` is its Continuation): records how the task
/// ended, tells the owner, and frees the body frame and the root.
inline void finish_root(Continuation& continuation, std::exception_ptr error) noexcept {
    auto& root = static_cast<RootTask&>(continuation);
    if (!error) {
        root.outcome_ = TaskState::Outcome::completed;
    } else {
        try {
            std::rethrow_exception(error);
        } catch (const Cancelled&) {
            root.outcome_ = TaskState::Outcome::cancelled;
        } catch (...) {
            root.outcome_ = TaskState::Outcome::failed;
        }
        root.error_ = std::move(error);
    }
    if (root.ListHook<ScopeTasksTag>::linked()) root.ListHook<ScopeTasksTag>::unlink();
    if (root.ListHook<LiveTasksTag>::linked()) root.ListHook<LiveTasksTag>::unlink();
    if (root.on_done_ != nullptr) root.on_done_(root.owner_, root);
    std::exchange(root.awaited_, {}).destroy();  // suspended at its final point: may go now
    if (TaskEndWatcher* watcher = task_end_watcher) watcher->task_ending(watcher, root);
    delete &root;
}

/// Destroys a task that is still suspended (loop shutdown): its frames innermost first, then
/// the root. Iterative, and allocates nothing, for chains of any depth (destroying the body
/// first would recurse through every Task awaiter's destructor).
inline void destroy_task_frames(RootTask& root) noexcept {
    ++destroying_suspended_frames;
    if (root.awaited_) {
        // Down to the innermost frame, through the Task awaiters the frames are suspended in.
        FrameLink* link = root.awaited_link_;
        while (Continuation* awaiter = link->awaiting_) link = awaiter->awaited_link_;
        // Back up, destroying each frame through the Continuation that owns it. The owner's
        // awaited_ is cleared first, so the awaiter (destroyed with the next frame up) does not
        // destroy it again.
        for (;;) {
            Continuation* owner = link->awaited_by_;
            std::coroutine_handle<> frame = std::exchange(owner->awaited_, {});
            if (!owner->resume_) {  // the root: `frame` is the body, the last one
                frame.destroy();
                break;
            }
            link = static_cast<TaskAwaitLink*>(owner)->parent_;
            frame.destroy();
        }
    }
    --destroying_suspended_frames;
    if (TaskEndWatcher* watcher = task_end_watcher) watcher->task_ending(watcher, root);
    delete &root;
}

}  // namespace anyio::detail
