ssh -i /home/vma/.ssh/cloudstack_key \
    -p 443 \
    -R 9081:localhost:8081 \          # OMA â†’ VMA API (reverse)
    -L 8082:localhost:8082 \          # VMA â†’ OMA API (forward)
    -L 10809:localhost:10809 \        # VMA â†’ OMA NBD (forward)
    -L 10808:localhost:10809 \        # VMA â†’ OMA NBD (alternate)
    -N \
    -o StrictHostKeyChecking=no \
    -o UserKnownHostsFile=/dev/null \
    -o ServerAliveInterval=30 \
    -o ServerAliveCountMax=3 \
    -o ConnectTimeout=30 \
    -o TCPKeepAlive=yes \
    -o ExitOnForwardFailure=yes \
    -o BatchMode=yes \
    "pgrayson@10.245.246.125"
