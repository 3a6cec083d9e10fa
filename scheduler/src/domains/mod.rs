//! Customers' own domains. So far: which hostnames may be added
//! (`hostname`). Ownership checks, certificates and serving come next
//! (issue 15).

pub mod hostname;
