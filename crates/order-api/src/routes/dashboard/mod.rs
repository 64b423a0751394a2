//! The live page: `/` and its script and style ([`assets`]), and the
//! admin-only endpoints it reads besides `GET /events`: queue depths each
//! second ([`queues`]), where recent orders stand ([`standings`]), the dead
//! letters and their replay ([`dead_letters`]), and a burst of orders
//! ([`burst`]).

mod assets;
mod burst;
mod dead_letters;
mod queues;
mod standings;

pub use self::dead_letters::{DeadLetterLock, dead_letters, replay};
pub use assets::{icon, page, script, style};
pub use burst::burst;
pub use queues::queues;
pub use standings::orders;

use crate::{
    auth::Caller,
    error::{ApiError, Result},
};

fn admin(caller: &Caller) -> Result<()> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "the live page's data is for admin keys",
        ))
    }
}
