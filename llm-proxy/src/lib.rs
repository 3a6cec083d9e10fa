//! ClawDeploy's metering proxy for model access (issue 37, being built):
//! so far what every later part rests on, money as integers (`money`) and
//! the pinned price table (`prices`).

pub mod money;
pub mod prices;
