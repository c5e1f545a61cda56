//! (tests land with their issue)
