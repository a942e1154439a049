//! EC2 failures, classified so the planner can react to each kind.

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

/// What went wrong, as far as the controller's reaction is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The ENI, attachment, subnet, group or instance does not exist.
    NotFound,
    /// The ENI is still attached (`InvalidNetworkInterface.InUse`).
    InUse,
    /// Another ENI already sits at the device index.
    DeviceIndexInUse,
    /// The instance cannot take another ENI (`AttachmentLimitExceeded`).
    AttachmentLimit,
    /// The subnet has no free addresses.
    SubnetFull,
    /// Throttled (`RequestLimitExceeded`), after the client's own retries.
    Throttled,
    /// The controller's IAM role may not do this.
    Unauthorized,
    /// EC2 rejected a parameter.
    InvalidParameter,
    /// A `ClientToken` was reused with other parameters
    /// (`IdempotentParameterMismatch`): the create needs a new token.
    TokenMismatch,
    /// Not sent: this replica's leader lease may have lapsed (see `lease::Fence`).
    NotLeader,
    /// Timeouts, connection failures and 5xx: worth retrying.
    Transient,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::InUse => "in_use",
            Self::DeviceIndexInUse => "device_index_in_use",
            Self::AttachmentLimit => "attachment_limit",
            Self::SubnetFull => "subnet_full",
            Self::Throttled => "throttled",
            Self::Unauthorized => "unauthorized",
            Self::InvalidParameter => "invalid_parameter",
            Self::TokenMismatch => "token_mismatch",
            Self::NotLeader => "not_leader",
            Self::Transient => "transient",
            Self::Other => "other",
        }
    }

    /// Classifies an EC2 error code (and, where EC2 overloads a code, its message).
    pub fn from_code(code: &str, message: &str) -> Self {
        match code {
            "InvalidNetworkInterfaceID.NotFound"
            | "InvalidNetworkInterfaceId.NotFound"
            | "InvalidAttachmentID.NotFound"
            | "InvalidSubnetID.NotFound"
            | "InvalidGroup.NotFound"
            | "InvalidGroupId.NotFound"
            | "InvalidInstanceID.NotFound"
            | "InvalidNetworkInterface.NotFound" => Self::NotFound,
            "InvalidNetworkInterface.InUse" => Self::InUse,
            "IdempotentParameterMismatch" => Self::TokenMismatch,
            "AttachmentLimitExceeded" => Self::AttachmentLimit,
            "InsufficientFreeAddressesInSubnet" => Self::SubnetFull,
            "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => Self::Throttled,
            "UnauthorizedOperation" | "AuthFailure" => Self::Unauthorized,
            "InvalidParameterValue" | "InvalidParameterCombination" | "InvalidParameter"
                if mentions_device_index(message) =>
            {
                Self::DeviceIndexInUse
            }
            "InvalidParameterValue" | "InvalidParameterCombination" | "InvalidParameter" => {
                Self::InvalidParameter
            }
            "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
                Self::Transient
            }
            _ => Self::Other,
        }
    }
}

/// EC2 reports an occupied device index as `InvalidParameterValue` with a message like
/// "Instance 'i-0abc' already has an interface attached at device index '1'."
fn mentions_device_index(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("device index") && (m.contains("already") || m.contains("in use"))
}

/// A failed EC2 call.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{operation}: {message}{}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
pub struct Ec2Error {
    /// The EC2 action.
    pub operation: &'static str,
    /// How the controller should treat it.
    pub kind: ErrorKind,
    /// EC2's error code, when it sent one.
    pub code: Option<String>,
    /// Human-readable message.
    pub message: String,
}

impl Ec2Error {
    /// An error of `kind` raised by the controller itself.
    pub fn new(operation: &'static str, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            operation,
            kind,
            code: None,
            message: message.into(),
        }
    }

    /// Maps an SDK error.
    pub fn from_sdk<E, R>(operation: &'static str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        match &err {
            SdkError::ServiceError(ctx) => {
                let code = ctx.err().code().map(str::to_string);
                let message = ctx
                    .err()
                    .message()
                    .map(str::to_string)
                    .unwrap_or_else(|| ctx.err().to_string());
                let kind = match code.as_deref() {
                    Some(c) => ErrorKind::from_code(c, &message),
                    None => ErrorKind::Other,
                };
                Self {
                    operation,
                    kind,
                    code,
                    message,
                }
            }
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
                Self::new(operation, ErrorKind::Transient, sdk_chain(&err))
            }
            SdkError::ResponseError(_) => {
                // Unparseable answers are mostly 5xx bodies from a proxy or emulator.
                Self::new(operation, ErrorKind::Transient, sdk_chain(&err))
            }
            _ => {
                let code = err.code().map(str::to_string);
                let kind = code
                    .as_deref()
                    .map(|c| ErrorKind::from_code(c, err.message().unwrap_or_default()))
                    .unwrap_or(ErrorKind::Other);
                Self {
                    operation,
                    kind,
                    code,
                    message: sdk_chain(&err),
                }
            }
        }
    }

    /// Whether the same call may succeed later without any change.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Throttled | ErrorKind::Transient)
    }
}

fn sdk_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_codes() {
        use ErrorKind::*;
        let cases = [
            ("InvalidNetworkInterfaceID.NotFound", "", NotFound),
            ("InvalidAttachmentID.NotFound", "", NotFound),
            ("InvalidNetworkInterface.InUse", "", InUse),
            ("AttachmentLimitExceeded", "", AttachmentLimit),
            ("RequestLimitExceeded", "", Throttled),
            ("UnauthorizedOperation", "", Unauthorized),
            (
                "InvalidParameterValue",
                "Instance 'i-1' already has an interface attached at device index '1'.",
                DeviceIndexInUse,
            ),
            ("InvalidParameterValue", "bad description", InvalidParameter),
            ("InternalError", "", Transient),
            ("Whatever", "", Other),
        ];
        for (code, msg, kind) in cases {
            assert_eq!(ErrorKind::from_code(code, msg), kind, "{code}");
        }
    }
}
