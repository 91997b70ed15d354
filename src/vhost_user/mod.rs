//! The vhost-user-blk backend: protocol glue over `vhost-user-backend`.
