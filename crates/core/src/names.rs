//! Enums with exact wire and database names: `as_str`, `FromStr` (an
//! unknown name is an error, never a default) and `Display`, declared once
//! per enum with [`names!`].

/// A stored or sent value that names no known variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`")]
pub struct UnknownVariant {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! names {
    ($type:ident, $kind:literal, $($variant:ident => $name:literal),+) => {
        impl $type {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)+
                }
            }
        }

        impl std::str::FromStr for $type {
            type Err = $crate::names::UnknownVariant;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok(Self::$variant),)+
                    other => Err($crate::names::UnknownVariant {
                        kind: $kind,
                        value: other.chars().take(64).collect(),
                    }),
                }
            }
        }

        impl std::fmt::Display for $type {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use names;
