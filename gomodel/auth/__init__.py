"""Who may use the gateway: the gateway key today; managed keys and limits next."""
