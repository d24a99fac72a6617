"""Load generators and measurements (`creditmeter bench-ledger`)."""
